"""``vhdx.export`` and ``vhdx.hash``: the export and hash engine as library calls.

Every result is judged against the disk read through ``vhdx.open`` (the read path has its own
model tests), and against ``hashlib`` over that read. The chain has three layers on a 24 MiB
disk with 1 MiB blocks; later layers overwrite earlier data with other data and with zeros.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

import vhdx

MiB = 1 << 20
SIZE = 24 * MiB


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def read_all(path: Path | str, **options) -> bytes:
    with vhdx.open(path, **options) as disk:
        return disk.pread(0, disk.size)


def folder_names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def build_chain(folder: Path) -> list[Path]:
    """[leaf, middle, base] in ``folder``."""
    base = folder / "base.vhdx"
    with vhdx.create(base, SIZE, block_size=MiB) as disk:
        disk.pwrite(pattern(3 * MiB + 100, 1), 0)
        disk.pwrite(pattern(5000, 2), 17 * MiB + 7)
        disk.pwrite(pattern(512, 3), SIZE - 512)
    middle = vhdx.snapshot(base)
    with vhdx.open(middle, "r+") as disk:
        disk.pwrite(pattern(3000, 4), 1000)
        disk.pwrite(bytes(2 * MiB), 2 * MiB)            # zeros over the base's data
        disk.pwrite(pattern(MiB, 5), 20 * MiB)
    leaf = vhdx.snapshot(middle)
    with vhdx.open(leaf, "r+") as disk:
        disk.pwrite(pattern(777, 6), 17 * MiB + 333)
        disk.pwrite(pattern(2, 7), 3 * MiB - 1)
    return [Path(leaf), Path(middle), base]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Built once, never written to afterwards."""
    return build_chain(tmp_path_factory.mktemp("export_api"))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_export_of_a_layer_equals_the_disk_read_through_open(chain: list[Path], tmp_path: Path,
                                                            layer: int) -> None:
    want = read_all(chain[layer])
    out = tmp_path / "out.raw"
    result = vhdx.export(chain[0], out, layer=layer)
    got = out.read_bytes()
    assert got == want, f"export layer={layer} differs from the read through vhdx.open"
    assert result.size == SIZE and result.sha256 is None
    assert result.method == ("kernel copy" if layer == 2 else "stream"), result
    assert result.bytes_written == result.data_bytes, "a sparse output writes only data"
    allocated = os.stat(out).st_blocks * 512
    print(f"layer {layer}: {result.method}, {result.data_bytes} bytes of data, {allocated} allocated")
    assert 0 < result.data_bytes < SIZE and allocated < SIZE, "the output is not sparse"
    assert folder_names(tmp_path) == ["out.raw"], "a temporary file was left behind"


def test_export_of_a_path_and_of_an_open_disk_agree(chain: list[Path], tmp_path: Path) -> None:
    with vhdx.open(chain[0]) as disk:
        result = vhdx.export(disk, tmp_path / "from-disk.raw", layer=1)
        assert not disk.closed, "export closed a Disk it was handed"
        assert disk.pread(17 * MiB + 333, 4) == pattern(777, 6)[:4]
        assert vhdx.hash(disk) == hashlib.sha256(read_all(chain[0])).hexdigest()
    assert (tmp_path / "from-disk.raw").read_bytes() == read_all(chain[1])
    assert result.method == "stream"
    with vhdx.open(chain[0]) as disk, pytest.raises(vhdx.UsageError):
        vhdx.export(disk, tmp_path / "x.raw", search_paths=[tmp_path])   # options belong to a path


@pytest.mark.parametrize("layer", [None, 0, 1, 2])
def test_hash_equals_hashlib_over_the_read(chain: list[Path], tmp_path: Path, layer: int | None) -> None:
    want = hashlib.sha256(read_all(chain[layer or 0])).hexdigest()
    assert vhdx.hash(chain[0], layer=layer) == want
    result = vhdx.export(chain[0], tmp_path / "hashed.raw", layer=layer, sha256=True)
    assert result.sha256 == want and result.method == "stream"
    assert hashlib.sha256((tmp_path / "hashed.raw").read_bytes()).hexdigest() == want


def test_export_refuses_an_existing_output_unless_overwrite(chain: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "exists.raw"
    garbage = b"\xa5" * (SIZE + MiB + 17)                # longer than the disk, and not zeros
    out.write_bytes(garbage)
    calls: list[int] = []
    with pytest.raises(vhdx.DiskExistsError) as info:
        vhdx.export(chain[0], out, progress=lambda done, total: calls.append(done))
    assert info.value.path == str(out) and isinstance(info.value, FileExistsError)
    assert calls == [], "the disk was read before the existing output was refused"
    assert out.read_bytes() == garbage, "the refused output was changed"
    dangling = tmp_path / "dangling.raw"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(vhdx.DiskExistsError):
        vhdx.export(chain[0], dangling)
    assert not (tmp_path / "nowhere").exists()

    vhdx.export(chain[0], out, overwrite=True)
    assert out.read_bytes() == read_all(chain[0])
    assert folder_names(tmp_path) == ["dangling.raw", "exists.raw"]


@pytest.mark.parametrize("target", ["leaf", "middle", "symlink-to-base", "hardlink-to-base", "fd-of-base"])
def test_export_into_a_file_of_the_chain_is_refused(chain: list[Path], tmp_path: Path, target: str) -> None:
    leaf, middle, base = chain
    before = {p: p.read_bytes() for p in chain}
    fd = None
    if target == "leaf":
        out: Path | int = leaf
    elif target == "middle":
        out = middle
    elif target == "symlink-to-base":
        out = tmp_path / "link.raw"
        out.symlink_to(base)
    elif target == "hardlink-to-base":
        out = tmp_path / "hard.raw"
        os.link(base, out)
    else:
        fd = out = os.open(base, os.O_WRONLY)
    try:
        with pytest.raises(vhdx.VhdxError, match="a file of the chain"):
            vhdx.export(leaf, out, overwrite=True)
        with pytest.raises(vhdx.VhdxError, match="a file of the chain"):
            vhdx.export(leaf, out, overwrite=True, layer=2)
    finally:
        if fd is not None:
            os.close(fd)
    changed = [p.name for p in chain if p.read_bytes() != before[p]]
    assert not changed, f"export into {target} changed {changed}"


def test_progress_is_called_with_increasing_totals(chain: list[Path], tmp_path: Path) -> None:
    runs = {}
    for name, call in (("stream", lambda cb: vhdx.export(chain[0], tmp_path / "s.raw", progress=cb)),
                       ("kernel copy", lambda cb: vhdx.export(chain[0], tmp_path / "k.raw", layer=2,
                                                              progress=cb)),
                       ("hash", lambda cb: vhdx.hash(chain[0], progress=cb))):
        calls: list[tuple[int, int]] = []
        call(lambda done, total: calls.append((done, total)))
        runs[name] = calls
        print(f"{name}: progress called {len(calls)} times")
        done = [d for d, _ in calls]
        assert len(calls) >= 2, f"{name}: {calls}"
        assert all(total == SIZE for _, total in calls), f"{name}: {calls}"
        assert done == sorted(done) and done[0] < done[-1], f"{name}: not increasing: {done}"
        assert calls[-1] == (SIZE, SIZE), f"{name}: ends at {calls[-1]}"


def test_export_to_a_file_descriptor_writes_every_byte_in_order(chain: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "dense.raw"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        result = vhdx.export(chain[0], fd, layer=1, sha256=True)
        os.fstat(fd)                                      # still open: the caller owns it
    finally:
        os.close(fd)
    want = read_all(chain[1])
    assert path.read_bytes() == want
    assert result.bytes_written == SIZE and 0 < result.data_bytes < SIZE, result
    assert result.sha256 == hashlib.sha256(want).hexdigest() and result.method == "stream"


def test_layer_beyond_the_chain_or_negative_is_a_usage_error(chain: list[Path], tmp_path: Path) -> None:
    for layer in (3, -1):
        with pytest.raises(vhdx.UsageError) as info:
            vhdx.export(chain[0], tmp_path / "none.raw", layer=layer)
        assert info.value.path == str(chain[0])
        with pytest.raises(vhdx.UsageError):
            vhdx.hash(chain[0], layer=layer)
    assert folder_names(tmp_path) == []


def test_chain_options_reach_open(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    leaf, middle, base = build_chain(tmp_path / "c")
    want = read_all(leaf)
    moved = tmp_path / "elsewhere.vhdx"
    base.rename(moved)
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.export(leaf, tmp_path / "refused.raw")
    assert not (tmp_path / "refused.raw").exists()
    vhdx.export(leaf, tmp_path / "given.raw", parents=[middle, moved])
    assert (tmp_path / "given.raw").read_bytes() == want
    zeros = vhdx.hash(leaf, missing_parent="zeros")
    assert zeros == hashlib.sha256(read_all(leaf, missing_parent="zeros")).hexdigest()
    assert zeros != vhdx.hash(leaf, parents=[middle, moved])


def test_the_library_prints_nothing(chain: list[Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    vhdx.export(chain[0], tmp_path / "quiet.raw", sha256=True)
    vhdx.export(chain[0], tmp_path / "quiet2.raw", layer=2)
    vhdx.hash(chain[0], layer=1)
    with pytest.raises(vhdx.DiskExistsError):
        vhdx.export(chain[0], tmp_path / "quiet.raw")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_export_and_hash_are_public(chain: list[Path]) -> None:
    assert "export" in vhdx.__all__ and "hash" in vhdx.__all__
    assert vhdx.export.__doc__ and vhdx.hash.__doc__
