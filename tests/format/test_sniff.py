"""Naming another disk format where a VHDX was expected: format.sniff (bytes in, a name out) and the
one-line error of every verb ("this is a VHD (v1) file; vhdx reads VHDX only")."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from support.forensic_chain import run_inprocess
from vhdx.format import sniff

MiB = 1 << 20


def vhd_footer(disk_type: int) -> bytes:
    footer = bytearray(512)
    footer[:8] = b"conectix"
    struct.pack_into(">I", footer, 60, disk_type)
    return bytes(footer)


def samples() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, words the name of its format must contain)."""
    vdi = bytearray(1024)
    vdi[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    struct.pack_into("<I", vdi, 0x40, 0xBEDA107F)
    iso = bytearray(0x9000)
    iso[0x8000:0x8006] = b"\x01CD001"
    return {
        "vhd-fixed": (bytes(2 * MiB) + vhd_footer(2), "fixed VHD (v1)"),
        "vhd-dynamic": (vhd_footer(3) + bytes(3000) + vhd_footer(3), "dynamic VHD (v1)"),
        "vhd-differencing": (vhd_footer(4) + bytes(3000) + vhd_footer(4), "differencing VHD (v1)"),
        "vhd-511-footer": (bytes(4096) + vhd_footer(2)[:511], "VHD (v1)"),
        "qcow2": (b"QFI\xfb" + struct.pack(">I", 3) + bytes(2000), "qcow2"),
        "qcow1": (b"QFI\xfb" + struct.pack(">I", 1) + bytes(2000), "qcow (v1)"),
        "vmdk-sparse": (b"KDMV" + struct.pack("<I", 1) + bytes(2000), "VMDK sparse extent"),
        "vmdk-descriptor": (b"# Disk DescriptorFile\nversion=1\n", "VMDK descriptor"),
        "vdi": (bytes(vdi), "VDI"),
        "iso": (bytes(iso), "ISO 9660"),
        "empty": (b"", "empty"),
    }


@pytest.mark.parametrize("name", sorted(samples()))
def test_sniff_names_the_format(name: str) -> None:
    data, words = samples()[name]
    found = sniff.sniff(data[:sniff.HEAD_SIZE], data[-sniff.TAIL_SIZE:] if data else b"")
    assert found is not None and words in found, (name, found)


@pytest.mark.parametrize("data", [b"vhdxfile" + bytes(5000), bytes(5000), b"this is not a virtual disk\n" * 50,
                                  b"x"])
def test_sniff_knows_nothing_else(data: bytes) -> None:
    assert sniff.sniff(data[:sniff.HEAD_SIZE], data[-sniff.TAIL_SIZE:]) is None


@pytest.mark.parametrize("verb", ["info", "check", "map", "chain"])
@pytest.mark.parametrize("name", sorted(samples()))
def test_every_verb_names_the_format_in_one_line(verb: str, name: str, tmp_path: Path) -> None:
    data, words = samples()[name]
    path = tmp_path / f"{name}.vhdx"
    path.write_bytes(data)
    result = run_inprocess(verb, path)
    assert result.returncode == 1, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], result.stderr
    if name != "empty":
        assert "vhdx reads VHDX only" in lines[0] and "too short" not in lines[0], lines[0]


@pytest.mark.parametrize("fmt,words", [("vpc", "VHD (v1)"), ("qcow2", "qcow2"), ("vmdk", "VMDK"), ("vdi", "VDI")])
def test_files_qemu_img_makes(fmt: str, words: str, tmp_path: Path, interop_tool) -> None:
    path = tmp_path / f"disk.{fmt}"
    subprocess.run([interop_tool("qemu-img"), "create", "-q", "-f", fmt, str(path), "16M"], check=True,
                   capture_output=True)
    result = run_inprocess("info", path)
    assert result.returncode == 1 and words in result.stderr and "VHDX only" in result.stderr, result.describe()
