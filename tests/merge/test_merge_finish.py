"""The last steps of a merge: finishing after an interruption, re-runs, and kept files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vhdx
from vhdx.errors import MergeError
from vhdx.ops.merge import run
from vhdx.ops.merge.journal import read_journal
from vhdx.ops.merge.run import merge
from vhdx.file.image import Image

MiB = 1 << 20


def small_chain(folder: Path) -> tuple[str, str, str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    base = str(folder / "base.vhdx")
    model = bytearray(4 * MiB)
    with vhdx.create(base, 4 * MiB, block_size=MiB) as d:
        d.write(b"A" * MiB)
        model[:MiB] = b"A" * MiB
    mid = vhdx.snapshot(base)
    with vhdx.open(mid, "r+") as d:
        d.seek(MiB)
        d.write(b"B" * 4096)
        model[MiB:MiB + 4096] = b"B" * 4096
    leaf = vhdx.snapshot(mid)
    with vhdx.open(leaf, "r+") as d:
        d.seek(100)
        d.write(b"C" * 1000)
        model[100:1100] = b"C" * 1000
    return base, mid, leaf, bytes(model)


def journal_state(path: str) -> str | None:
    image = Image.open(path)
    try:
        j = read_journal(image)
        return j.get("state") if j else None
    finally:
        image.close()


def test_finished_merge_leaves_a_done_record_and_a_rerun_is_a_no_op(tmp_path: Path) -> None:
    base, mid, leaf, model = small_chain(tmp_path)
    result = merge(leaf, base)
    assert result.bytes_copied > 0 and not os.path.exists(leaf) and not os.path.exists(mid)
    assert journal_state(base) == "done"
    again = merge(leaf, base)  # the same command again: nothing left to do
    assert again.bytes_copied == 0 and again.plan.resuming and again.deleted == []
    with vhdx.open(base) as d:
        assert d.read() == model
    assert not vhdx.ops.merge.journal.merge_in_progress(Image.open(base))


def test_a_kept_disk_is_invalid_and_refused_for_a_second_merge(tmp_path: Path) -> None:
    base, mid, leaf, model = small_chain(tmp_path)
    merge(leaf, base, keep=True)
    assert os.path.exists(leaf) and os.path.exists(mid)
    assert not vhdx.chain(mid).complete  # let go of the merged base: it would read stale data
    with pytest.raises(MergeError, match="already merged"):
        merge(mid, base)
    with vhdx.open(base) as d:
        assert d.read() == model


def test_dry_run_sees_a_pending_finish(tmp_path: Path) -> None:
    base, mid, leaf, model = small_chain(tmp_path)
    calls = []

    def stop_before_cleanup(dest, dest_path, keep, wrap, *args):
        calls.append(dest_path)
        raise OSError(5, "simulated crash before the cleanup")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "complete", stop_before_cleanup)
        with pytest.raises(MergeError):
            merge(leaf, base)
    assert calls and journal_state(base) == "copied"
    plan = merge(leaf, base, dry_run=True)
    assert plan.resuming and plan.bytes_to_copy == 0
    assert journal_state(base) == "copied"  # the dry run wrote nothing
    result = merge(leaf, base)
    assert result.plan.resuming and result.bytes_copied == 0
    assert not os.path.exists(leaf) and not os.path.exists(mid)
    assert journal_state(base) == "done"
    with vhdx.open(base) as d:
        assert d.read() == model


def test_a_resumed_merge_gives_back_space_an_interrupted_run_allocated(tmp_path: Path) -> None:
    """Blocks allocated by an interrupted batch but never put in the BAT are trimmed on resume:
    whatever the crash point, the finished destination is no bigger than after a clean merge."""
    from support.merging import FaultPlan, PowerLoss, copy_folder, merge_through
    pristine = tmp_path / "pristine"
    base, mid, leaf, model = small_chain(pristine)
    names = [Path(p).name for p in (base, mid, leaf)]
    clean = tmp_path / "clean"
    copy_folder(pristine, clean)
    counting = FaultPlan(None)
    merge_through(counting.wrap, str(clean / names[2]), str(clean / names[0]))
    clean_size = os.path.getsize(clean / names[0])
    work = tmp_path / "work"
    for n in range(1, counting.calls + 1):
        copy_folder(pristine, work)
        with pytest.raises((PowerLoss, vhdx.VhdxError)):
            merge_through(FaultPlan(n).wrap, str(work / names[2]), str(work / names[0]))
        merge(str(work / names[2]), str(work / names[0]))
        assert os.path.getsize(work / names[0]) <= clean_size, f"crash at call {n}"
        with vhdx.open(str(work / names[0])) as d:
            assert d.read() == model, f"crash at call {n}"
