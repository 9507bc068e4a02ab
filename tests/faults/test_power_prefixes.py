"""Power loss simulated from a recording: every prefix of an operation's writes, with the
unflushed ones landing at random, must leave files that open to the old or the new state.

A recording run of each operation (:mod:`operations`: a write that allocates a block of a
dynamic disk, a partial-block write in a child, a reparent to a shorter path, a merge) keeps
every write, truncate and flush it makes, per file, in order (and the merge's deletions).
For each cut point the files are rebuilt from the originals (:func:`support.faults.materialize`):
everything before each file's last completed flush, then each later 4 KiB page (and each later
truncate) with probability 1/2, seeded by the cut. The result must read (a dirty log replayed
in memory) as the state before the operation or after it, pass ``vhdx check`` with no error,
and the operation run again must give the new state.

``VHDX_POWER_PREFIX_SEEDS`` (default 1) tries more random subsets per cut point.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.faults import FaultPlan, power_loss_prefixes, record, recording_unlinks
from operations import OPERATIONS
from support.chain import check_problems

SEEDS = int(os.environ.get("VHDX_POWER_PREFIX_SEEDS", "1"))


@pytest.mark.parametrize("name", ["allocate", "child-partial", "reparent", "merge"])
def test_every_power_loss_prefix_opens_to_old_or_new_state(name: str, scratch: Path) -> None:
    op = OPERATIONS[name]
    pristine, work = scratch / "pristine", scratch / "work"
    op.build(pristine)
    old = op.state(pristine)

    def run(folder: Path, plan: FaultPlan) -> None:
        with recording_unlinks(plan):
            op.run(folder, plan)

    rec = record(pristine, scratch / "recorded", run)
    new = op.state(rec.recorded)
    ops = rec.ops
    assert sum(o.kind == "flush" for o in ops) > 2, f"too few flushes recorded: {[o.kind for o in ops]}"
    failures = []
    tried = 0
    for where in power_loss_prefixes(rec, work, SEEDS):
        tried += 1
        try:
            state = op.state(work)
        except Exception as e:  # noqa: BLE001 - garbage is what this test looks for
            failures.append(f"{where}: the files do not open: {type(e).__name__}: {e}")
            continue
        if state not in (old, new):
            failures.append(f"{where}: the files read neither the old nor the new state")
        failures += [f"{where}: {p}" for p in check_problems(work)]
        try:
            op.run(work, FaultPlan(None))
            if op.state(work) != new:
                failures.append(f"{where}: re-running the operation does not give the new state")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{where}: re-running the operation raised {type(e).__name__}: {e}")
    print(f"{name}: {len(ops)} recorded calls, power-loss prefixes tried: {tried}")
    assert not failures, f"{len(failures)} of {tried} prefixes fail:\n" + "\n".join(failures[:12])
