"""The guard rails of merge: refusals change nothing; failures leave a usable chain.

* Siblings (another child of the destination): refused with a MergeError that names them; the
  files are bit-for-bit unchanged. ``force`` merges anyway and reports them as broken.
* A middle layer (one that has a child): its child would be orphaned, so it is a dependent too.
* ID mismatch (the parent was modified after the snapshot): refused unless ``ignore_id_mismatch``.
* Disk full (ENOSPC past a byte budget, from a storage wrapper and from the OS calls themselves):
  a MergeError saying the disk is full; every file passes check, the child still reads the same, a re-run completes.
* The free-space precheck and a read-only destination: MergeError before anything is written.
* Dry run: nothing written; the plan counts the bytes.
* An interrupted merge shows in ``vhdx chain`` and ``vhdx check`` as a warning (exit 0), and
  ``vhdx merge`` run again finishes it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import vhdx
from vhdx.ops.merge.journal import interrupted_merge_at
from vhdx.errors import MergeError, ParentMismatchError, ParentNotFoundError, VhdxError
from vhdx.file.image import Image
from vhdx.file.storage import Storage

from support.merging import (MiB, FaultPlan, LayerSpec, PowerLoss, all_checks_pass, assert_same, build_chain,
                       check_errors, cli, copy_folder, data_write_guid, folder_hashes, merge,
                       merge_through, rand_bytes, read_disk, vhdx_files)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SIZE = 6 * MiB + 512


def small_chain(folder: Path, *, children: int = 1, seed: int = 3, lss: int = 512):
    """base (1 MiB blocks) <- children (2 MiB / 1 MiB blocks); a full and a partial block in each."""
    rng = np.random.default_rng(seed)
    specs = [LayerSpec(MiB, [(0, rand_bytes(rng, 2 * MiB)), (4 * MiB + 3 * lss, rand_bytes(rng, 5000))])]
    for i in range(children):
        bs = 2 * MiB if i % 2 == 0 else MiB
        specs.append(LayerSpec(bs, [(bs, rand_bytes(rng, bs)), (3 * MiB + 64 * 1024, rand_bytes(rng, 64 * 1024)),
                                    (5 * MiB + 100, rand_bytes(rng, 777))]))
    return build_chain(folder, size=SIZE, logical_sector_size=lss, base_fixed=False, layers=specs)


def snapshot_with_writes(parent: str, seed: int, block_size: int = MiB) -> tuple[str, list[tuple[int, bytes]]]:
    rng = np.random.default_rng(seed)
    child = vhdx.snapshot(parent, block_size=block_size)
    writes = [(2 * MiB, rand_bytes(rng, MiB)), (512 * 3, rand_bytes(rng, 4096))]
    with vhdx.open(child, "r+") as disk:
        for off, data in writes:
            disk.seek(off)
            disk.write(data)
    return child, writes


def apply(model: bytes, writes) -> bytes:
    m = bytearray(model)
    for off, data in writes:
        m[off:off + len(data)] = data
    return bytes(m)


# ------------------------------------------------------------------ siblings and dependents

def test_sibling_refused_then_forced(tmp_path: Path) -> None:
    built = small_chain(tmp_path)
    c1 = built.leaf
    c2, w2 = snapshot_with_writes(built.base, seed=11)   # a sibling of c1
    model_c2 = apply(built.models[0], w2)
    before = folder_hashes(tmp_path)

    plan = merge(c1, dry_run=True)
    assert [os.path.basename(d) for d in plan.dependents] == [os.path.basename(c2)]

    with pytest.raises(MergeError) as info:
        merge(c1)
    assert os.path.basename(c2) in str(info.value)
    assert folder_hashes(tmp_path) == before, "a refused merge changed a file"

    rc, text = cli("merge", c1)
    assert rc != 0 and os.path.basename(c2) in text, text
    assert folder_hashes(tmp_path) == before, "a refused CLI merge changed a file"
    assert_same(read_disk(c2), model_c2, "the sibling after the refusals")

    result = merge(c1, force=True)
    assert [os.path.realpath(p) for p in result.broken_dependents] == [os.path.realpath(c2)]
    assert not os.path.exists(c1)
    assert_same(read_disk(built.base), built.models[-1], "the base after the forced merge")
    assert check_errors(built.base) == []
    layers = vhdx.chain(c2).layers
    assert layers[0].linkage == "mismatch", [l.to_dict() for l in layers]
    with pytest.raises(ParentMismatchError):
        vhdx.open(c2).close()


def test_cli_force_reports_broken_sibling(tmp_path: Path) -> None:
    built = small_chain(tmp_path)
    c2, _ = snapshot_with_writes(built.base, seed=12)
    rc, text = cli("merge", built.leaf, "--force", "--json")
    assert rc == 0, text
    d = json.loads(text[text.index("{"):])
    assert [os.path.basename(p) for p in d["broken_dependents"]] == [os.path.basename(c2)]
    assert_same(read_disk(built.base), built.models[-1], "the base after the CLI merge")


def test_merging_a_middle_layer_lists_its_child_as_dependent(tmp_path: Path) -> None:
    """base <- mid <- leaf: merging ``mid`` (and deleting it) orphans ``leaf``, so ``leaf`` is a
    dependent: refused without force, like a sibling (docs/format.md §9.5, "merging a non-leaf
    disk: the caller must re-point that disk's children")."""
    built = small_chain(tmp_path, children=2)
    mid, leaf = built.paths[1], built.paths[2]
    before = folder_hashes(tmp_path)
    plan = merge(mid, dry_run=True)
    assert [os.path.basename(d) for d in plan.dependents] == [os.path.basename(leaf)], \
        f"merge({os.path.basename(mid)}) would delete it and orphan {os.path.basename(leaf)}; dependents: " \
        f"{plan.dependents}"
    with pytest.raises(MergeError) as info:
        merge(mid)
    assert os.path.basename(leaf) in str(info.value)
    assert folder_hashes(tmp_path) == before
    assert_same(read_disk(leaf), built.models[-1], "the leaf after the refusal")


# ------------------------------------------------------------------ ID mismatch

def test_id_mismatch_refused_unless_ignored(tmp_path: Path) -> None:
    built = small_chain(tmp_path)
    child = built.leaf
    extra = [(4 * MiB, b"\x5a" * 8192), (MiB + 512, b"\x33" * 1024)]
    with vhdx.open(built.base, "r+") as disk:       # the parent changes after the snapshot
        for off, data in extra:
            disk.seek(off)
            disk.write(data)
    before = folder_hashes(tmp_path)
    with pytest.raises(VhdxError) as info:
        merge(child)
    assert isinstance(info.value, (ParentMismatchError, MergeError)), type(info.value)
    assert folder_hashes(tmp_path) == before
    rc, text = cli("merge", child)
    assert rc != 0 and "mismatch" in text.lower(), text
    assert folder_hashes(tmp_path) == before

    # What the child reads over the modified parent is what the parent must hold afterwards.
    expected = read_disk(child, ignore_id_mismatch=True)
    assert expected == apply(apply(built.models[0], extra), built.specs[1].writes), "model of the mismatched chain"
    result = merge(child, ignore_id_mismatch=True)
    assert not os.path.exists(child)
    assert result.new_data_write_guid == data_write_guid(built.base)
    assert_same(read_disk(built.base), expected, "the base after merging over an ID mismatch")
    assert check_errors(built.base) == []


# ------------------------------------------------------------------ disk full

class SpaceLimit:
    """A shared byte budget over every file the merge writes; past it, ENOSPC."""

    def __init__(self, budget: int, exc: str = "oserror") -> None:
        self.budget = budget
        self.used = 0
        self.hit = 0
        self.exc = exc

    def wrap(self, storage: Storage) -> Storage:
        return FullStorage(storage, self)

    def spend(self, n: int, what: str, path: str) -> None:
        if self.used + n > self.budget:
            self.hit += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.used += n


class FullStorage(Storage):
    def __init__(self, inner: Storage, limit: SpaceLimit) -> None:
        self.inner, self.limit = inner, limit
        self.path, self.writable = inner.path, inner.writable

    def readinto(self, buf, offset):
        return self.inner.readinto(buf, offset)

    def size(self):
        return self.inner.size()

    def write(self, data, offset):
        self.limit.spend(len(memoryview(data).cast("B")), "write", self.path)
        self.inner.write(data, offset)

    def truncate(self, size):
        grow = max(0, size - self.inner.size())
        self.limit.spend(grow, "truncate", self.path)
        self.inner.truncate(size)

    def flush(self):
        self.inner.flush()

    def close(self):
        self.inner.close()

    def fileno(self):
        return None


def _merge_bytes_written(folder: Path, leaf: str, dest: str) -> int:
    limit = SpaceLimit(1 << 62)
    merge_through(limit.wrap, str(folder / leaf), str(folder / dest))
    return limit.used


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.2, 0.5, 0.9, 0.99])
def test_disk_full_from_storage_wrapper(fraction: float, tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    built = small_chain(pristine, children=2)
    leaf, dest = Path(built.leaf).name, Path(built.base).name
    model = built.models[-1]
    copy_folder(pristine, tmp_path / "count")
    total = _merge_bytes_written(tmp_path / "count", leaf, dest)
    work = tmp_path / "work"
    copy_folder(pristine, work)
    limit = SpaceLimit(int(total * fraction))
    # Whether ENOSPC comes up bare (this wrapper) or inside a VhdxError (FileStorage), the merge
    # stops with one MergeError that says the disk is full; the OSError stays in its chain.
    with pytest.raises(MergeError) as info:
        merge_through(limit.wrap, str(work / leaf), str(work / dest))
    assert limit.hit, "the budget was never reached"
    print(f"fraction {fraction}: {info.value}")
    assert "disk full" in str(info.value) or "cleanup stopped" in str(info.value), info.value
    err = info.value
    while err is not None and not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        err = err.__cause__ or err.__context__
    assert err is not None, f"ENOSPC is not in the chain of {info.value!r}"
    _judge_after_failure(work, leaf, dest, model)


def test_disk_full_from_the_os(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC from the real os.pwrite/os.ftruncate under FileStorage (no wrapper at all)."""
    pristine = tmp_path / "pristine"
    built = small_chain(pristine, children=2)
    leaf, dest = Path(built.leaf).name, Path(built.base).name
    model = built.models[-1]
    copy_folder(pristine, tmp_path / "count")
    total = _merge_bytes_written(tmp_path / "count", leaf, dest)
    import vhdx.file.storage as storage_mod
    real_pwrite, real_ftruncate, real_fstat = os.pwrite, os.ftruncate, os.fstat
    real_copy_file_range = getattr(os, "copy_file_range", None)
    for fraction in (0.0, 0.05, 0.5, 0.95):
        work = tmp_path / "work"
        copy_folder(pristine, work)
        state = {"left": int(total * fraction), "hit": 0}

        def pwrite(fd, data, offset):
            n = len(memoryview(data).cast("B"))
            if n > state["left"]:
                state["hit"] += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            state["left"] -= n
            return real_pwrite(fd, data, offset)

        def ftruncate(fd, size):
            grow = max(0, size - real_fstat(fd).st_size)
            if grow > state["left"]:
                state["hit"] += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            state["left"] -= grow
            return real_ftruncate(fd, size)

        def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
            if count > state["left"]:
                state["hit"] += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_copy_file_range(src, dst, count, offset_src, offset_dst)
            state["left"] -= n
            return n

        monkeypatch.setattr(storage_mod.os, "pwrite", pwrite)
        monkeypatch.setattr(storage_mod.os, "ftruncate", ftruncate)
        if real_copy_file_range is not None:  # the merge copies with it where the OS has it
            monkeypatch.setattr(storage_mod.os, "copy_file_range", copy_file_range)
        try:
            with pytest.raises(MergeError, match="disk full|cleanup stopped"):
                merge(str(work / leaf), str(work / dest))
        finally:
            monkeypatch.undo()
        assert state["hit"], f"fraction {fraction}: the budget was never reached"
        _judge_after_failure(work, leaf, dest, model)


def _judge_after_failure(work: Path, leaf: str, dest: str, model: bytes) -> None:
    problems = all_checks_pass(work)
    assert not problems, problems
    assert vhdx.chain(str(work / leaf)).complete
    assert_same(read_disk(work / leaf), model, "the child after the failed merge")
    merge(str(work / leaf), str(work / dest))          # the re-run, with space
    assert not (work / leaf).exists()
    assert_same(read_disk(work / dest), model, "the destination after the re-run")
    assert check_errors(work / dest) == []


def test_free_space_precheck(tmp_path: Path, monkeypatch) -> None:
    built = small_chain(tmp_path, children=2)
    before = folder_hashes(tmp_path)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - MiB, MiB))
    plan = FaultPlan(None)
    with pytest.raises(MergeError) as info:
        merge_through(plan.wrap, built.leaf, built.base)
    assert "space" in str(info.value).lower()
    assert plan.calls == 0, f"writes before the free-space check: {plan.history}"
    monkeypatch.undo()
    assert folder_hashes(tmp_path) == before
    assert_same(read_disk(built.leaf), built.models[-1], "the child after the refusal")


# ------------------------------------------------------------------ read-only destination

def test_read_only_destination(tmp_path: Path) -> None:
    built = small_chain(tmp_path, children=2)
    os.chmod(built.base, 0o444)
    try:
        before = folder_hashes(tmp_path)
        plan = FaultPlan(None)
        with pytest.raises(MergeError):
            merge_through(plan.wrap, built.leaf, built.base)
        assert plan.calls == 0, f"writes although the destination is read-only: {plan.history}"
        assert folder_hashes(tmp_path) == before
        rc, text = cli("merge", built.leaf, "--into", built.base)
        assert rc != 0 and "read-only" in text, text
        assert folder_hashes(tmp_path) == before
    finally:
        os.chmod(built.base, 0o644)
    assert_same(read_disk(built.leaf), built.models[-1], "the child")


# ------------------------------------------------------------------ dry run

def test_dry_run_writes_nothing_and_counts(tmp_path: Path) -> None:
    lss = 512
    specs = [LayerSpec(MiB, [(0, b"\x01" * (3 * MiB))]),
             LayerSpec(2 * MiB, [(2 * MiB, b"\x02" * (2 * MiB)), (4 * MiB + 8 * lss, b"\x03" * (16 * lss))]),
             LayerSpec(MiB, [(5 * MiB, b"\x04" * MiB), (4 * MiB + 8 * lss, b"\x05" * (4 * lss)),
                             (100 * lss, b"\x06" * lss)])]
    built = build_chain(tmp_path, size=SIZE, logical_sector_size=lss, base_fixed=False, layers=specs)
    stamps = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in vhdx_files(tmp_path)}
    before = folder_hashes(tmp_path)
    plan = merge(built.leaf, built.base, dry_run=True)
    # The middle layer: a full 2 MiB block and 16 sectors, 4 of which the leaf covers; the leaf:
    # a full 1 MiB block, those 4 sectors and one more.
    assert plan.bytes_to_copy == 2 * MiB + 16 * lss + MiB + lss, plan
    assert plan.bytes_of_zeros == 0
    per_source = {os.path.basename(k): v for k, v in plan.per_source_bytes.items()}
    assert per_source == {os.path.basename(built.paths[2]): MiB + 5 * lss,
                          os.path.basename(built.paths[1]): 2 * MiB + 12 * lss}, per_source
    assert plan.destination_blocks >= 3 and plan.allocations >= 1 and plan.bytes_to_allocate >= MiB
    assert not plan.resuming and plan.dependents == []
    rc, text = cli("merge", built.leaf, "--into", built.base, "--dry-run", "--json")
    assert rc == 0, text
    d = json.loads(text[text.index("{"):])
    assert d["bytes_to_copy"] == plan.bytes_to_copy
    rc, text = cli("merge", built.leaf, "--dry-run")
    assert rc == 0 and "nothing was written" in text, text
    assert folder_hashes(tmp_path) == before
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in vhdx_files(tmp_path)} == stamps
    result = merge(built.leaf, built.base)
    assert result.bytes_copied == plan.bytes_to_copy


# ------------------------------------------------------------------ interrupted merge, as users see it

class FailOnData(FaultPlan):
    """Power loss at the first big write to ``name``: the merge journal is in place by then."""

    def __init__(self, name: str) -> None:
        super().__init__(None)
        self.name = name

    def tick(self, what: str) -> bool:
        fail = super().tick(what)
        parts = what.split()
        return fail or (what.startswith(self.name + ":") and parts[1] == "write" and int(parts[2]) >= 256 * 1024)


def test_interrupted_merge_is_a_warning_and_rerun_finishes_it(tmp_path: Path) -> None:
    built = small_chain(tmp_path, children=2)
    leaf, base = built.leaf, built.base
    fp = FailOnData(os.path.basename(base))
    with pytest.raises((PowerLoss, VhdxError)):
        merge_through(fp.wrap, leaf, base)
    for path in (leaf, base):
        rc, text = cli("check", path)  # 3: the space the merge had grown the base by is a leak until the re-run
        assert rc in ((0, 3) if path == base else (0,)), f"vhdx check {path} exit {rc} after an interrupted merge:\n{text}"
        assert "merge into this disk was interrupted" in text and "warning" in text, text
    rc, text = cli("chain", leaf)
    assert rc == 0 and "INTERRUPTED MERGE" in text, text
    assert "chain complete" in text, text
    rc, text = cli("chain", leaf, "--json")
    d = json.loads(text[text.index("{"):])
    flagged = [os.path.basename(l["path"]) for l in d["layers"] if l["interrupted_merge"]]
    assert flagged == [os.path.basename(base)], d
    assert interrupted_merge_at(vhdx.chain(leaf).layers[-1].path)
    assert not hasattr(vhdx.chain(leaf).layers[-1], "interrupted_merge")  # Layer knows nothing of merging
    assert_same(read_disk(leaf), built.models[-1], "the child after the interruption")

    rc, text = cli("merge", leaf, "--into", base, "--dry-run")
    assert rc == 0 and "resuming" in text, text
    rc, text = cli("merge", leaf, "--into", base)
    assert rc == 0, text
    assert not os.path.exists(leaf)
    rc, text = cli("check", base)
    assert rc == 0 and "was interrupted" not in text, text
    assert_same(read_disk(base), built.models[-1], "the base after the re-run")


def test_progress_callback(tmp_path: Path) -> None:
    built = small_chain(tmp_path, children=2)
    calls = []
    plan = merge(built.leaf, built.base, dry_run=True)
    merge(built.leaf, built.base, progress=lambda done, total: calls.append((done, total)))
    assert calls, "progress was never called"
    dones = [c[0] for c in calls]
    assert dones == sorted(dones), "progress went backwards"
    assert all(t == plan.bytes_to_copy + plan.bytes_of_zeros for _, t in calls)
    assert dones[-1] == calls[-1][1], f"progress ended at {dones[-1]} of {calls[-1][1]}"


def test_parent_found_through_search_paths(tmp_path: Path) -> None:
    built = small_chain(tmp_path / "a", children=1)
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    moved = elsewhere / "renamed-base.vhdx"
    shutil.move(built.base, moved)
    before = folder_hashes(tmp_path / "a")
    with pytest.raises(ParentNotFoundError):
        merge(built.leaf)
    assert folder_hashes(tmp_path / "a") == before
    result = merge(built.leaf, search_paths=[str(elsewhere)])
    assert os.path.samefile(result.plan.destination, moved)
    assert_same(read_disk(moved), built.models[-1], "the moved base after the merge")
    assert check_errors(moved) == []
    assert stat.S_IMODE(os.stat(moved).st_mode) & 0o200


# ------------------------------------------------------------------ a leaf whose last session crashed

@pytest.mark.parametrize("depth", [1, 2])
def test_merge_of_a_leaf_with_a_dirty_log(depth: int, tmp_path: Path) -> None:
    """The leaf's last write session lost power after its log entry was durable: the log must be
    honoured (replayed in memory for reading, in place when the leaf is rewritten) by the merge."""
    from vhdx.file.storage import FileStorage
    pristine = tmp_path / "pristine"
    built = small_chain(pristine, children=depth)
    leaf = Path(built.leaf).name
    dest = Path(built.base).name
    rng = np.random.default_rng(8)
    writes = [(4 * MiB + 512, rand_bytes(rng, 3000)), (MiB - 4096, rand_bytes(rng, 3 * MiB))]
    model = apply(built.models[-1], writes)

    def session(folder: Path, fail_at: int | None) -> FaultPlan:
        fp = FaultPlan(fail_at)
        storage = fp.wrap(FileStorage(str(folder / leaf), writable=True))
        try:
            disk = vhdx.open(str(folder / leaf), "r+", storage=storage)
            for off, data in writes:
                disk.seek(off)
                disk.write(data)
            disk.close()
        except (PowerLoss, VhdxError):
            pass
        return fp

    count = tmp_path / "count"
    copy_folder(pristine, count)
    K = session(count, None).calls
    picked = []
    work = tmp_path / "work"
    for n in range(1, K + 1):
        copy_folder(pristine, work)
        session(work, n)
        im = Image.open(str(work / leaf), "r")
        dirty = im.log_was_dirty
        im.close()
        if dirty and read_disk(work / leaf) == model:
            picked.append(n)
    assert picked, "no crash point leaves the whole write in a dirty log"
    for n in sorted({picked[0], picked[len(picked) // 2], picked[-1]}):
        copy_folder(pristine, work)
        session(work, n)
        merge(str(work / leaf), str(work / dest))
        assert not (work / leaf).exists()
        assert_same(read_disk(work / dest), model, f"the destination (leaf crashed at call {n} of {K})")
        assert all_checks_pass(work) == []
