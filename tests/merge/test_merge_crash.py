"""A merge interrupted at every write and flush, and by SIGKILL, must leave a usable chain.

Power loss at call N: a :class:`~support.faults.FaultPlan` counts the mutating calls
(write, truncate, flush) of every file the merge opens for writing, through
``merge_through(plan.wrap, ...)``. A counting run learns their total K; then for every N in 1..K a
fresh copy of the chain is merged with the power failing at the N-th call (that call fails, and
every later call on any file). Afterwards (docs/format.md §9.5, "an interrupted merge leaves the
child still usable, and the merge can be run again"):

* every file still present passes ``check_file`` (read-only: logs replayed in memory) with no error;
* the chain of the child is complete, and the child reads exactly the model;
* running the same ``merge(child, into)`` again, without extra flags, completes; the destination
  then reads the model, passes check, and no longer carries the interrupted-merge journal.

The drop-unflushed variant also loses a random half of the 4 KiB pages each file received since
its last flush (§7.4: data is flushed before the log entry that points at it).

SIGKILL: a real ``python -m vhdx merge`` process on a bigger chain is killed at random moments
(fixed seed), then judged the same way.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support.needs import unavailable

import vhdx
from vhdx.ops.merge.journal import merge_in_progress, read_journal
from vhdx.errors import MergeError, VhdxError
from vhdx.file.image import Image

from support.merging import (MiB, FaultPlan, LayerSpec, PowerLoss, all_checks_pass, build_chain, check_errors,
                       copy_folder, first_difference, merge, merge_through, python_env, python_exe, rand_bytes,
                       read_disk, standard_writes, vhdx_files)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@dataclass
class CrashScenario:
    name: str
    logical_sector_size: int
    size: int
    blocks: list[int]          # base first
    base_fixed: bool
    into: str                  # "base" (the whole chain) or "parent"


SCENARIOS = [
    CrashScenario("3-layers-into-base-512", 512, 6 * MiB + 512, [1 * MiB, 2 * MiB, 1 * MiB], False, "base"),
    CrashScenario("3-layers-into-parent-4096", 4096, 5 * MiB + 4096, [2 * MiB, 1 * MiB, 4 * MiB], False, "parent"),
    CrashScenario("3-layers-into-fixed-base-512", 512, 4 * MiB + 1024, [4 * MiB, 1 * MiB, 2 * MiB], True, "base"),
]
DROP_SCENARIOS = SCENARIOS[:2]


def make_chain(folder: Path, sc: CrashScenario, seed: int = 7):
    rng = np.random.default_rng(seed)
    ss = sc.logical_sector_size
    specs = []
    for i, bs in enumerate(sc.blocks):
        writes = standard_writes(rng, sc.size, bs, ss, 5)
        if i:   # a whole block and a partial one in every child, so there is data to copy
            writes.append((bs, rand_bytes(rng, min(bs, sc.size - bs))))
            writes.append((2 * MiB + 8 * ss, rand_bytes(rng, 64 * 1024)))
        specs.append(LayerSpec(bs, writes))
    return build_chain(folder, size=sc.size, logical_sector_size=ss, base_fixed=sc.base_fixed, layers=specs)


def judge_interrupted(work: Path, leaf: str, dest: str, model: bytes) -> list[str]:
    """Everything that must hold after an interruption, then the re-run. Returns problems."""
    problems = all_checks_pass(work)
    leaf_path, dest_path = work / leaf, work / dest
    if leaf_path.exists():
        try:
            ch = vhdx.chain(str(leaf_path))
            if not ch.complete:
                problems.append("the child's chain is broken: "
                                + "; ".join(f"{os.path.basename(l.path)} {l.linkage}" for l in ch.layers))
        except Exception as e:  # noqa: BLE001
            problems.append(f"vhdx.chain(child) raised {type(e).__name__}: {e}")
        try:
            got = read_disk(leaf_path)
            if got != model:
                problems.append(f"the child reads differently: {first_difference(got, model)}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"reading through the child raised {type(e).__name__}: {e}")
        try:
            merge(str(leaf_path), str(dest_path))
        except Exception as e:  # noqa: BLE001
            problems.append(f"re-running the merge raised {type(e).__name__}: {e}")
            return problems
        if leaf_path.exists():
            problems.append("the re-run left the child behind")
    else:
        # The merge got as far as deleting the child: the same command finishes what is left
        # (the journal goes last, so an interruption here still shows in check and chain).
        try:
            merge(str(leaf_path), str(dest_path))
        except Exception as e:  # noqa: BLE001
            problems.append(f"re-running the merge after the child was deleted raised {type(e).__name__}: {e}")
    # The merge completed (now or before the interruption): the destination is the model.
    return problems + finished(dest_path, model, read_errors=True)


def finished(dest_path: Path, model: bytes, *, read_errors: bool) -> list[str]:
    """What is wrong with the destination of a merge run again to its end: it must read
    ``model``, pass check and carry no journal (``read_errors``: a failing read is reported,
    not raised)."""
    problems = []
    try:
        got = read_disk(dest_path)
        if got != model:
            problems.append(f"the destination reads differently after the re-run: {first_difference(got, model)}")
    except Exception as e:  # noqa: BLE001
        if not read_errors:
            raise
        problems.append(f"reading the destination raised {type(e).__name__}: {e}")
    problems += [f"after the re-run: {p}" for p in check_errors(dest_path)]
    im = Image.open(str(dest_path), "r")
    try:
        if merge_in_progress(im):
            problems.append("the destination still carries the merge journal after the re-run")
    finally:
        im.close()
    return problems


def linked_to(child: Path, parent: Path) -> bool:
    """Whether either parent linkage of ``child`` is ``parent``'s DataWriteGuid (the chain itself may
    resolve elsewhere: the copies of the test keep absolute locators into the pristine folder)."""
    images = [Image.open(str(p), "r") for p in (child, parent)]
    try:
        loc = images[0].metadata.parent_locator or {}
        guid = "{%s}" % images[1].header.data_write_guid
        return guid in (loc.get("parent_linkage", "").lower(), loc.get("parent_linkage2", "").lower())
    finally:
        for im in images:
            im.close()


def judge_interrupted_keep(work: Path, leaf: str, dest: str, model: bytes) -> list[str]:
    """After an interrupted ``keep=True`` merge: the child stays; until the merge got past its copy
    it reads the model through its chain; ``merge(..., keep=True)`` again finishes (or says the
    merge was done and the child kept); the destination then reads the model and the kept child
    no longer opens over it (it let go: its chain is not complete)."""
    problems = all_checks_pass(work)
    leaf_path, dest_path = work / leaf, work / dest
    if not leaf_path.exists():
        return problems + ["keep: the child was deleted"]
    im = Image.open(str(dest_path), "r")
    try:
        state = (read_journal(im) or {}).get("state")
    finally:
        im.close()
    try:
        if vhdx.chain(str(leaf_path)).complete:
            got = read_disk(leaf_path)
            if got != model:
                problems.append(f"the child reads differently: {first_difference(got, model)}")
        elif state not in ("copied", "done"):
            problems.append(f"the child's chain is broken while the journal says {state!r}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"reading through the child raised {type(e).__name__}: {e}")
    try:
        merge(str(leaf_path), str(dest_path), keep=True)
    except MergeError as e:
        if not (state == "done" and "kept with --keep" in str(e)):
            problems.append(f"re-running the merge raised {e}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"re-running the merge raised {type(e).__name__}: {e}")
    problems += finished(dest_path, model, read_errors=False)
    if not leaf_path.exists() or linked_to(leaf_path, dest_path):
        problems.append("after the re-run the kept child is gone or still links to the destination")
    return problems


def crash_everywhere(sc: CrashScenario, tmp_path: Path, *, drop: bool, keep: bool = False) -> None:
    pristine = tmp_path / "pristine"
    built = make_chain(pristine, sc)
    model = built.models[-1]
    leaf = Path(built.leaf).name
    dest = Path(built.paths[0] if sc.into == "base" else built.paths[-2]).name
    judge = judge_interrupted_keep if keep else judge_interrupted

    counting = tmp_path / "count"
    copy_folder(pristine, counting)
    plan = FaultPlan(None)
    merge_through(plan.wrap, str(counting / leaf), str(counting / dest), keep=keep)
    K = plan.calls
    print(f"{sc.name}: {K} mutating calls")
    assert K > 5, f"only {K} mutating calls counted: is the storage wrapper applied? {plan.history}"
    assert read_disk(counting / dest) == model
    files_written = {s.path for s in plan.storages}
    assert len(files_written) >= 2, f"expected the destination and the layer above it to be wrapped: {files_written}"

    failures = []
    work = tmp_path / "work"
    for n in range(1, K + 1):
        copy_folder(pristine, work)
        fp = FaultPlan(n, drop_unflushed=drop, seed=n)
        error: BaseException | None = None
        try:
            merge_through(fp.wrap, str(work / leaf), str(work / dest), keep=keep)
        except (PowerLoss, VhdxError) as e:
            error = e
        except Exception as e:  # noqa: BLE001 - anything else is a bug of its own
            error = e
            failures.append(f"N={n}: unexpected {type(e).__name__}: {e}")
        if error is None:
            failures.append(f"N={n}: the merge did not fail although call {n} of {K} lost power")
        problems = judge(work, leaf, dest, model)
        if problems:
            failures.append(f"N={n} ({fp.history[-1] if fp.history else '?'}): " + " | ".join(problems))
    assert not failures, f"{len(failures)} of {K} crash points fail:\n" + "\n".join(failures[:15])


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_power_loss_at_every_call(sc: CrashScenario, fast_tmp: Path) -> None:
    crash_everywhere(sc, fast_tmp, drop=False)


@pytest.mark.parametrize("sc", DROP_SCENARIOS, ids=lambda s: s.name)
def test_power_loss_drops_unflushed_pages(sc: CrashScenario, fast_tmp: Path) -> None:
    crash_everywhere(sc, fast_tmp, drop=True)


@pytest.mark.parametrize("drop", [False, True], ids=["clean", "drop-unflushed"])
def test_power_loss_at_every_call_of_a_kept_merge(drop: bool, fast_tmp: Path) -> None:
    """With ``keep`` the layer above the destination stays open for writing, in one log session,
    from step 1 until it lets go of the destination at the end: every call of that order too."""
    crash_everywhere(SCENARIOS[1], fast_tmp, drop=drop, keep=True)


def test_power_loss_again_during_the_rerun(fast_tmp: Path) -> None:
    """Crash, then crash the re-run too (at a few seeded points), then finish: resuming from a
    resumed state (journal already there, linkage already handed over) must be as safe."""
    sc = SCENARIOS[1]
    pristine = fast_tmp / "pristine"
    built = make_chain(pristine, sc)
    model = built.models[-1]
    leaf = Path(built.leaf).name
    dest = Path(built.paths[-2]).name
    counting = fast_tmp / "count"
    copy_folder(pristine, counting)
    plan = FaultPlan(None)
    merge_through(plan.wrap, str(counting / leaf), str(counting / dest))
    K = plan.calls
    rng = random.Random(5)
    crashed, work = fast_tmp / "crashed", fast_tmp / "work"
    failures = []
    for n1 in range(2, K, 4):
        copy_folder(pristine, crashed)
        with pytest.raises((PowerLoss, VhdxError)):
            merge_through(FaultPlan(n1).wrap, str(crashed / leaf), str(crashed / dest))
        copy_folder(crashed, counting)
        again = FaultPlan(None)
        merge_through(again.wrap, str(counting / leaf), str(counting / dest))
        for n2 in sorted(rng.sample(range(1, again.calls + 1), min(3, again.calls))):
            copy_folder(crashed, work)
            fp = FaultPlan(n2, drop_unflushed=bool(n2 % 2), seed=n1 * 1000 + n2)
            try:
                merge_through(fp.wrap, str(work / leaf), str(work / dest))
                failures.append(f"N1={n1} N2={n2}: the re-run did not fail")
            except (PowerLoss, VhdxError):
                pass
            problems = judge_interrupted(work, leaf, dest, model)
            if problems:
                failures.append(f"N1={n1} N2={n2} ({fp.history[-1]}): " + " | ".join(problems))
    assert not failures, "\n".join(failures[:15])


def test_interrupted_merge_resumes_with_the_same_guid(tmp_path: Path) -> None:
    """A re-run after an interruption in the copy phase reuses the journal's DataWriteGuid and says so."""
    built = make_chain(tmp_path, SCENARIOS[0])

    # Fail at the first big data write to the destination: the journal is in place by then.
    class FailOnData(FaultPlan):
        def tick(self, what: str) -> bool:
            fail = super().tick(what)
            return fail or ("base.vhdx: write" in what and int(what.split()[2]) >= 256 * 1024)

    fp = FailOnData(None)
    with pytest.raises((PowerLoss, VhdxError)):
        merge_through(fp.wrap, built.leaf, built.base)
    im = Image.open(built.base, "r")
    try:
        assert merge_in_progress(im), f"no journal after a failure in the copy phase: {fp.history}"
        guid_during = str(im.header.data_write_guid)
    finally:
        im.close()
    dry = merge(built.leaf, built.base, dry_run=True)
    assert dry.resuming, "the plan of the re-run does not say it resumes"
    result = merge(built.leaf, built.base)
    assert result.new_data_write_guid == guid_during
    assert read_disk(built.base) == built.models[-1]


# ------------------------------------------------------------------ SIGKILL of a real process

KILL_ROUNDS = int(os.environ.get("VHDX_MERGE_KILL_ROUNDS", "8"))
KILL_MIN_INTERRUPTED = 3


def make_big_chain(folder: Path):
    """64 MiB, 1 MiB blocks, 3 layers; most blocks written in both children."""
    rng = np.random.default_rng(99)
    size = 64 * MiB
    base = [(0, rand_bytes(rng, 24 * MiB)), (40 * MiB + 512, rand_bytes(rng, 3 * MiB))]
    mid = [(i * MiB + 4096, rand_bytes(rng, MiB // 2)) for i in range(0, 64, 2)]
    mid += [(33 * MiB, rand_bytes(rng, 8 * MiB))]
    top = [(16 * MiB, rand_bytes(rng, 40 * MiB)), (60 * MiB + 777, rand_bytes(rng, 100_000))]
    return build_chain(folder, size=size, logical_sector_size=512, base_fixed=False,
                       layers=[LayerSpec(MiB, base), LayerSpec(MiB, mid), LayerSpec(MiB, top)])


def _merge_cmd(leaf: Path, dest: Path) -> list[str]:
    return [python_exe(), "-m", "vhdx", "merge", str(leaf), "--into", str(dest), "--no-progress"]


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of each disk: copytree keeps mtimes, so any write by the merge shows."""
    out = {}
    for p in vhdx_files(folder):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out[p.name] = (st.st_size, st.st_mtime_ns)
    return out


def start_and_wait_for_first_write(cmd: list[str], folder: Path, pristine: dict, env: dict,
                                   timeout: float = 30.0) -> tuple[subprocess.Popen, float]:
    """Start the merge process; return once it has changed a file (or exited), with the time then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if stamps(folder) != pristine:
            break
        time.sleep(0.001)
    return proc, time.monotonic()


def test_sigkill_during_merge(tmp_path: Path) -> None:
    """Kill a real ``python -m vhdx merge`` process at random moments of its work.

    The merge of this 64 MiB chain takes a fraction of a second after the interpreter has
    started, so the random delay (seeded) is counted from the process's first change to a file
    and drawn over the measured length of the merge: kills land in every phase (linkage handover,
    journal, copy, metadata, deletion) instead of mostly during the interpreter's start-up.
    """
    pristine = tmp_path / "pristine"
    built = make_big_chain(pristine)
    model = built.models[-1]
    leaf, dest = Path(built.leaf).name, Path(built.base).name
    pristine_stamps = stamps(pristine)
    env = python_env()
    rng = random.Random(20240611)

    # Calibrate: from the first write to the end of the process.
    work = tmp_path / "work"
    copy_folder(pristine, work)
    proc, t_first = start_and_wait_for_first_write(_merge_cmd(work / leaf, work / dest), work, pristine_stamps, env)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    merge_part = max(0.02, time.monotonic() - t_first)
    assert_model = read_disk(work / dest)
    assert assert_model == model, "the uninterrupted CLI merge is wrong"

    outcomes: list[str] = []
    failures = []
    rounds = 0
    while rounds < KILL_ROUNDS or (outcomes.count("interrupted") < KILL_MIN_INTERRUPTED
                                   and rounds < 3 * KILL_ROUNDS):
        rounds += 1
        copy_folder(pristine, work)
        delay = rng.uniform(0.0, 1.1 * merge_part)
        proc, _ = start_and_wait_for_first_write(_merge_cmd(work / leaf, work / dest), work, pristine_stamps, env)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        if proc.returncode == 0:
            outcomes.append("completed")
        elif proc.returncode == -signal.SIGKILL:
            if not (work / leaf).exists():
                outcomes.append("deleting")         # killed while deleting the merged files
            else:
                outcomes.append("interrupted" if stamps(work) != pristine_stamps else "before")
        else:
            failures.append(f"round {rounds}: exit {proc.returncode}: {err.decode(errors='replace')[-500:]}")
            continue
        problems = judge_interrupted(work, leaf, dest, model)
        if problems:
            failures.append(f"round {rounds} ({outcomes[-1]}, killed {delay:.3f} s after the first write): "
                            + " | ".join(problems))
    summary = {k: outcomes.count(k) for k in ("before", "interrupted", "deleting", "completed")}
    print(f"SIGKILL rounds: {summary}; merge takes {merge_part:.3f} s after its first write")
    assert not failures, f"outcomes {summary}:\n" + "\n".join(failures)
    if summary["interrupted"] < KILL_MIN_INTERRUPTED:
        unavailable(
            f"SIGKILL landed inside the merge only {summary['interrupted']} times in {rounds} rounds "
                    f"({summary}); the merge takes {merge_part:.3f} s")
