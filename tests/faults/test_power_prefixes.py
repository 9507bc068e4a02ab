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
import random
from pathlib import Path

import pytest

from support.faults import FaultPlan, materialize, recording_unlinks
from operations import OPERATIONS
from support.chain import check_problems, copy_folder

SEEDS = int(os.environ.get("VHDX_POWER_PREFIX_SEEDS", "1"))


def rebuild(work: Path, pristine: Path, recorded: Path, files: dict[str, bytes | None]) -> None:
    """``work`` = the pristine files with the materialized ones (named by their recorded path) in place."""
    copy_folder(pristine, work)
    for path, data in files.items():
        target = work / Path(path).relative_to(recorded)
        if data is None:
            target.unlink()
        else:
            target.write_bytes(data)


@pytest.mark.parametrize("name", ["allocate", "child-partial", "reparent", "merge"])
def test_every_power_loss_prefix_opens_to_old_or_new_state(name: str, scratch: Path) -> None:
    op = OPERATIONS[name]
    pristine, recorded, work = scratch / "pristine", scratch / "recorded", scratch / "work"
    op.build(pristine)
    old = op.state(pristine)
    copy_folder(pristine, recorded)
    originals = {os.path.abspath(p): p.read_bytes() for p in recorded.iterdir()}
    plan = FaultPlan(None, record=True)
    with recording_unlinks(plan):
        op.run(recorded, plan)
    new = op.state(recorded)
    ops = plan.ops
    assert sum(o.kind == "flush" for o in ops) > 2, f"too few flushes recorded: {[o.kind for o in ops]}"
    failures = []
    tried = 0
    for cut in range(len(ops) + 1):
        for seed in range(SEEDS):
            tried += 1
            rebuild(work, pristine, recorded, materialize(ops, cut, originals, random.Random(cut * 1000 + seed)))
            where = f"cut {cut}/{len(ops)} seed {seed} (after {ops[cut - 1].kind} of {Path(ops[cut - 1].path).name})" \
                if cut else "cut 0"
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
