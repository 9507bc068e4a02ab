"""compact, resize and convert judged by qemu-img and libvhdi, and run on disks qemu made.

* ``qemu-img convert -O raw`` of our converted disk equals the source's export;
* ``vhdx convert`` of a disk qemu-img made reads identically (to us, qemu-img and libvhdi);
* a qemu-made disk compacted and grown (its BAT moved) passes ``qemu-img check`` and reads the same.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import vhdx
from support.disk import MiB, assert_same, disk_bytes, nonzero_pattern

from support.maintenance import ChainSpec, allocated_blocks, build_chain, judge, libvhdi_bytes, qemu_raw


def qemu(exe: str, *args: object) -> None:
    r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"{exe} {args}: {r.stdout}{r.stderr}"


def qemu_made(interop_tool, folder: Path) -> tuple[Path, bytes]:
    """A 20 MiB dynamic VHDX by qemu-img convert from a raw image with data, zeros and holes."""
    raw = folder / "src.raw"
    data = bytearray(20 * MiB)
    data[0:3 * MiB] = nonzero_pattern(1, 3 * MiB)
    data[9 * MiB + 77:9 * MiB + 5000] = nonzero_pattern(2, 5000 - 77)
    data[-512:] = nonzero_pattern(3, 512)
    raw.write_bytes(data)
    out = folder / "qemu.vhdx"
    qemu(interop_tool("qemu-img"), "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M",
         raw, out)
    with vhdx.open(out, "r+") as d:          # zeros stored as data: what compact gives back
        d.pwrite(bytes(2 * MiB), 12 * MiB)
    return out, bytes(data)


def test_qemu_reads_our_converted_chain_as_its_export(tmp_path: Path, interop_tool) -> None:
    paths, model = build_chain(tmp_path, ChainSpec(size=10 * MiB + 512, block_sizes=[2 * MiB, MiB, MiB], seed=5))
    vhdx.export(paths[-1], tmp_path / "export.raw")
    for kind in ("dynamic", "fixed"):
        out = tmp_path / f"{kind}.vhdx"
        vhdx.convert(paths[-1], out, disk_type=kind, block_size=MiB)
        got = qemu_raw(interop_tool("qemu-img"), out, tmp_path / "q.raw")
        assert_same(got, (tmp_path / "export.raw").read_bytes(), f"qemu-img convert of our {kind} disk")
        assert_same(got, model, "the model")


def test_a_disk_qemu_made_converts_identically(tmp_path: Path, interop_tool) -> None:
    src, data = qemu_made(interop_tool, tmp_path)
    want = bytearray(data)
    want[12 * MiB:14 * MiB] = bytes(2 * MiB)
    out = tmp_path / "ours.vhdx"
    result = vhdx.convert(src, out, sha256=True, block_size=2 * MiB)
    judge(out, want, "vhdx convert of a qemu-made disk")
    assert_same(qemu_raw(interop_tool("qemu-img"), out, tmp_path / "q.raw"), want, "qemu-img reading it")
    assert_same(libvhdi_bytes(interop_tool("pyvhdi"), [out], len(want)), want, "libvhdi reading it")
    assert result.blocks_written == allocated_blocks(out) == 4   # blocks 0, 1 (3 MiB), 4 (9 MiB), 9 (the end)
    with vhdx.open(src) as s, vhdx.open(out) as o:
        assert s.disk_id == o.disk_id


def test_a_qemu_made_disk_compacted_and_grown_passes_qemu_check(tmp_path: Path, interop_tool) -> None:
    src, data = qemu_made(interop_tool, tmp_path)
    want = bytearray(data)
    want[12 * MiB:14 * MiB] = bytes(2 * MiB)
    before = src.stat().st_size
    result = vhdx.compact(src)
    assert result.zero_blocks == 2 and src.stat().st_size < before
    judge(src, want, "compacted")
    assert_same(qemu_raw(interop_tool("qemu-img"), src, tmp_path / "q.raw"), want, "qemu-img after compact")
    grown = vhdx.resize(src, 200_000 * MiB)
    assert grown.bat_moved
    qemu(interop_tool("qemu-img"), "check", "-f", "vhdx", src)
    vhdx.resize(src, len(want))
    assert_same(qemu_raw(interop_tool("qemu-img"), src, tmp_path / "q.raw"), want, "qemu-img after grow + shrink")
    assert_same(libvhdi_bytes(interop_tool("pyvhdi"), [src], len(want)), want, "libvhdi after grow + shrink")
    assert_same(disk_bytes(src), want, "ours after grow + shrink")
