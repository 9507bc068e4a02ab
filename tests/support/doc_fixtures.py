"""The files the docs' console transcripts assume, built for tests/docs/test_doc_transcripts.py.

A transcript names what it needs with ``<!-- setup: NAME -->`` above its block; :data:`FIXTURES`
maps each NAME to a builder ``build(root, specimen)``. ``root`` is the session's scratch folder,
which stands for ``/`` (``root / "vms"`` is the transcript's ``/vms``); ``specimen(name)`` gives
the decompressed path of a file of ../shared/specimens (the ``specimen`` fixture of
tests/conftest.py). Everything is small and deterministic: the same bytes on every run, only
the GUIDs the library draws differ (the transcript runner pairs them). Checkpoints whose names
the docs show are created under those names (``vhdx.create(..., parent=...)``), so listings sort
the same way on every run.

To add a fixture: write ``def build_x(root, specimen)`` and add it to :data:`FIXTURES`.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import uuid
from pathlib import Path
from typing import Callable

import vhdx
from vhdx.file.image import Image
from vhdx.format import constants as C
from vhdx.format.checksum import crc32c_zeroed

from support import filesystems

MIB = 1 << 20
Specimen = Callable[[str], Path]

FILL_BASE = """\
import vhdx
with vhdx.open("SRV01.vhdx", "r+") as disk:
    disk.write(b"BOOT" * (1 << 20))               # 4 MiB at 0
    disk.seek(100 << 20)
    disk.write(b"DATA" * (256 << 10))             # 1 MiB at 100 MiB
"""
FILL_CP1 = """\
import sys, vhdx
with vhdx.open(sys.argv[1], "r+") as disk:       # the parent is opened read-only
    disk.seek(1 << 20)
    disk.write(b"CP1." * (16 << 10))              # 64 KiB at 1 MiB
    disk.seek(128 << 20)
    disk.write(b"NEW1" * (5 << 18))               # 5 MiB at 128 MiB
"""
FILL_CP2 = """\
import sys, vhdx
with vhdx.open(sys.argv[1], "r+") as disk:
    disk.seek(2 << 20)
    disk.write(b"CP2." * 1024)                    # 4 KiB at 2 MiB
    disk.seek((200 << 20) + 7)
    disk.write(b"unaligned!")                     # 10 bytes inside one sector
"""
BOOT_BASE = """\
import vhdx
with vhdx.open("APP01.vhdx", "r+") as disk:       # a write to the parent after the checkpoint
    disk.seek(50 << 20)
    disk.write(b"boot" * 128)                     # 512 bytes at 50 MiB
"""


def folder(root: Path, shown: str) -> Path:
    """``root / shown`` (``shown`` as the transcript writes it, e.g. ``/vms/old-host``), created."""
    path = root / shown.lstrip("/")
    path.mkdir(parents=True, exist_ok=True)
    return path


def pattern(tag: str, length: int) -> bytes:
    """``length`` bytes of ``tag`` repeated: recognisable, and the same on every run."""
    unit = tag.encode("ascii")
    return (unit * (length // len(unit) + 1))[:length]


def write(path: Path, writes: list[tuple[int, int, str]]) -> None:
    """Open ``path`` r+ and write ``pattern(tag, length)`` at each ``(offset, length, tag)``."""
    with vhdx.open(path, "r+") as disk:
        for offset, length, tag in writes:
            disk.seek(offset)
            disk.write(pattern(tag, length))


def checkpoint(parent: Path, name: str, writes: list[tuple[int, int, str]]) -> Path:
    """A checkpoint ``name`` beside ``parent`` (as ``vhdx snapshot`` would link it), written."""
    path = parent.parent / name
    vhdx.create(path, parent=parent).close()
    write(path, writes)
    return path


def base(path: Path, size: int, writes: list[tuple[int, int, str]], **options: int) -> Path:
    """A dynamic disk at ``path``, written."""
    vhdx.create(path, size, **options).close()
    write(path, writes)
    return path


def sparse_copy(source: Path, destination: Path) -> None:
    """Copy ``source``'s data ranges (``SEEK_DATA``/``SEEK_HOLE``), leaving its holes holes."""
    with open(source, "rb") as src, open(destination, "wb") as out:
        size, at = os.fstat(src.fileno()).st_size, 0
        while at < size:
            try:
                start = os.lseek(src.fileno(), at, os.SEEK_DATA)
            except OSError:             # ENXIO: only a hole is left
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            src.seek(start)
            out.seek(start)
            while start < end:
                chunk = src.read(min(8 * MIB, end - start))
                out.write(chunk)
                start += len(chunk)
            at = end
        out.truncate(size)


def set_log_guid(path: Path, log_guid: uuid.UUID) -> None:
    """Give both headers of ``path`` a LogGuid (with valid CRCs) while the log stays empty."""
    with open(path, "r+b") as f:
        for at in (0x10000, 0x20000):
            f.seek(at)
            header = bytearray(f.read(4096))
            header[48:64] = log_guid.bytes_le
            struct.pack_into("<I", header, 4, crc32c_zeroed(header))
            f.seek(at)
            f.write(header)


def flip_byte(path: Path, offset: int) -> None:
    """Invert the byte at ``offset`` of ``path``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def vhd_v1(path: Path, size: int) -> None:
    """A minimal dynamic VHD (v1): footer copy, dynamic header, one BAT sector, footer."""
    footer = bytearray(512)
    struct.pack_into(">8sIIQI4sIIQQIII", footer, 0, b"conectix", 2, 0x00010000, 512, 0, b"vhdx",
                     0x00010000, 0x5769326B, size, size, 0, 3, 0)
    footer[68:84] = uuid.UUID(int=0x0123456789ABCDEF).bytes
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    header = bytearray(1024)
    struct.pack_into(">8sQQIII", header, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, 1536, 0x00010000,
                     max(1, size >> 21), 2 * MIB)
    struct.pack_into(">I", header, 36, ~sum(header) & 0xFFFFFFFF)
    path.write_bytes(bytes(footer) + bytes(header) + b"\xff" * 512 + bytes(footer))


# --------------------------------------------------------------------------------------------
# docs/guide.md
# --------------------------------------------------------------------------------------------

def build_guide_scripts(root: Path, specimen: Specimen) -> None:
    """``/vms`` with the three write scripts the guide's small chain uses."""
    vms = folder(root, "/vms")
    for name, text in (("fill_base.py", FILL_BASE), ("fill_cp1.py", FILL_CP1), ("fill_cp2.py", FILL_CP2)):
        (vms / name).write_text(text, encoding="utf-8")


def build_guide_damaged(root: Path, specimen: Specimen) -> None:
    """``/tmp/samples``: hdr.vhdx (one byte of header 1 changed), rt.vhdx (one byte of each
    region table changed), junk.vhdx (random bytes), tr.vhdx (64 MiB, both blocks written,
    cut to 20 MiB) and old.vhd (a dynamic VHD v1)."""
    samples = folder(root, "/tmp/samples")
    for name in ("hdr.vhdx", "rt.vhdx"):
        base(samples / name, 64 * MIB, [(0, 4096, "data")])
    flip_byte(samples / "hdr.vhdx", 0x10000 + 0x100)
    flip_byte(samples / "rt.vhdx", 0x30000 + 0x40)
    flip_byte(samples / "rt.vhdx", 0x40000 + 0x40)
    (samples / "junk.vhdx").write_bytes(random.Random(14).randbytes(MIB))
    base(samples / "tr.vhdx", 64 * MIB, [(0, MIB, "first"), (40 * MIB, MIB, "second")])
    os.truncate(samples / "tr.vhdx", 20 * MIB)
    vhd_v1(samples / "old.vhd", 64 * MIB)


def build_guide_lab(root: Path, specimen: Specimen) -> None:
    """``/tmp/lab`` with boot_base.py (a 512-byte write into APP01.vhdx at 50 MiB)."""
    (folder(root, "/tmp/lab") / "boot_base.py").write_text(BOOT_BASE, encoding="utf-8")


def build_guide_keep(root: Path, specimen: Specimen) -> None:
    """An empty ``/vms/keep``."""
    folder(root, "/vms/keep")


# --------------------------------------------------------------------------------------------
# docs/howto-forensics.md
# --------------------------------------------------------------------------------------------

def srv01_chain(where: Path, first: str, second: str) -> None:
    """SRV01.vhdx (256 MiB, 32 MiB written) and two checkpoints named ``first``, ``second``."""
    disk = base(where / "SRV01.vhdx", 256 * MIB, [(0, 32 * MIB, "SRV01 system ")])
    middle = checkpoint(disk, first, [(8 * MIB, 6 * MIB, "SRV01 update ")])
    checkpoint(middle, second, [(200 * MIB, 2 * MIB, "SRV01 logs "), (202 * MIB, MIB, "tail ")])


def build_evidence(root: Path, specimen: Specimen) -> None:
    """``/evidence`` with the dirty-log specimen (WIN10-DIRTY.vhdx), the orphaned checkpoint
    specimen (orphan.avhdx), the SRV01 chain in ``srv01`` and a disk whose log cannot be
    replayed in ``damaged/log.vhdx``; an empty ``/case``."""
    evidence = folder(root, "/evidence")
    folder(root, "/case")
    sparse_copy(specimen("discutils-win10-dirtylog-dynamic-1G.vhdx"), evidence / "WIN10-DIRTY.vhdx")
    sparse_copy(specimen("dissect-hypervisor-differencing-8G-orphan.avhdx"), evidence / "orphan.avhdx")
    srv01_chain(folder(root, "/evidence/srv01"), "SRV01_B3BF4FE0-CFAC-480B-AB54-1C7B41FF8C2E.avhdx",
                "SRV01_78171058-2416-4E5E-8022-910DC6D4C1AA.avhdx")
    damaged = folder(root, "/evidence/damaged")
    base(damaged / "log.vhdx", 64 * MIB, [(0, 4096, "log")])
    set_log_guid(damaged / "log.vhdx", uuid.UUID("932b454c-84b6-4466-9346-b3a6f58fc58d"))


def build_evidence_ext4(root: Path, specimen: Specimen) -> None:
    """``/evidence/ws01``: WS01.vhdx holding a GPT disk with an ext4 file system (40 MiB, made with
    mkfs.ext4, changed through a loop mount: needs root) and a checkpoint that deleted
    ``/old/a.txt``, created ``/docs/added.txt``, appended to ``/tail.log`` and rewrote the first
    64 KiB of ``/big.bin``; each layer holds exactly the sectors that changed (tests/support/filesystems.py)."""
    filesystems.require("ext4")
    where = folder(root, "/evidence/ws01")
    rnd = random.Random(1)
    steps = [
        filesystems.Step([("mkdir", "/docs", b""), ("write", "/docs/keep.txt", b"unchanged\n" * 50),
                    ("write", "/big.bin", rnd.randbytes(700_000)), ("mkdir", "/old", b""),
                    ("write", "/old/a.txt", b"a" * 5000), ("write", "/tail.log", b"log\n" * 100)]),
        filesystems.Step([("delete", "/old/a.txt", b""), ("write", "/docs/added.txt", b"late\n"),
                    ("append", "/tail.log", b"more\n" * 10), ("overwrite", "/big.bin", rnd.randbytes(65536))]),
    ]
    filesystems.build(where, "ext4", "gpt", steps, names=["WS01.vhdx", "WS01_5C1E4A07-2B9D-4F1E-9C3A-61D0E8B7F245.avhdx"])
    (where / "fs.raw").unlink()
    (where / "mnt").rmdir()


# --------------------------------------------------------------------------------------------
# docs/howto-merge-orphaned-checkpoints.md
# --------------------------------------------------------------------------------------------

def build_old_host(root: Path, specimen: Specimen) -> None:
    """``/vms/old-host`` with one machine per situation, and ``/mnt/backup/DB01.vhdx``:

    * SRV01: a base and two checkpoints in a line;
    * DB01: a checkpoint whose base was moved to /mnt/backup;
    * APP01: a base written to after its checkpoint was taken (ID mismatch);
    * WEB01: a base with two branches, one of them two checkpoints long.
    """
    host = folder(root, "/vms/old-host")
    srv01_chain(host, "SRV01_10849AE7-F4AE-4245-ADD4-7BC9DB0097B0.avhdx",
                "SRV01_10BE0387-7E1A-44CB-9385-C603871F596C.avhdx")
    db01 = base(host / "DB01.vhdx", 256 * MIB, [(0, 8 * MIB, "DB01 pages ")])
    checkpoint(db01, "DB01_4EAB5674-CF48-4300-9CE7-337CD2F780D1.avhdx", [(4 * MIB, MIB, "DB01 log ")])
    shutil.move(db01, folder(root, "/mnt/backup") / "DB01.vhdx")
    app01 = base(host / "APP01.vhdx", 128 * MIB, [(0, 4 * MIB, "APP01 ")])
    checkpoint(app01, "APP01_7FD2575D-7FB3-46A4-AD23-6917BBC7DEA4.avhdx", [(2 * MIB, MIB, "APP01 new ")])
    write(app01, [(50 * MIB, 512, "mounted ")])
    web01 = base(host / "WEB01.vhdx", 512 * MIB, [(0, 16 * MIB, "WEB01 site ")])
    current = checkpoint(web01, "WEB01_ECDDA5A2-47F9-4490-8747-D5843B820DD6.avhdx", [(6 * MIB, 2 * MIB, "v2 ")])
    checkpoint(current, "WEB01_2554D01A-F87B-4247-98A8-C7A8F74CB6CD.avhdx", [(100 * MIB, MIB, "v3 ")])
    checkpoint(web01, "WEB01_BD924B64-F0BB-4011-93DD-275CB51C7516.avhdx", [(4 * MIB, 2 * MIB, "test ")])
    folder(root, "/vms/rescue")


def build_fs01(root: Path, specimen: Specimen) -> None:
    """``/vms/fs01``: FS01.vhdx (512 MiB, 16 MiB blocks) and a checkpoint with 96 MiB of data."""
    fs01 = base(folder(root, "/vms/fs01") / "FS01.vhdx", 512 * MIB, [(0, 4 * MIB, "FS01 ")], block_size=16 * MIB)
    checkpoint(fs01, "FS01_85E2FCBC-42F3-455B-A5D9-37D25813CE1F.avhdx", [(64 * MIB, 96 * MIB, "shares ")])


# --------------------------------------------------------------------------------------------
# docs/howto-maintenance.md
# --------------------------------------------------------------------------------------------

def build_wsl_ext4(root: Path, specimen: Specimen) -> None:
    """``/vms/wsl/ext4.vhdx``: 1 GiB, 1 MiB blocks (as WSL makes them), 48 MiB of data and 60 MiB
    of blocks a guest zeroed (``zerofree``) stored as data, with data behind the zeros in the file."""
    disk = folder(root, "/vms/wsl") / "ext4.vhdx"
    vhdx.create(disk, 1 << 30, block_size=MIB).close()
    with vhdx.open(disk, "r+") as d:
        d.pwrite(pattern("system ", 24 * MIB), 0)
        d.pwrite(bytes(40 * MIB), 24 * MIB)
        d.pwrite(pattern("home ", 16 * MIB), 64 * MIB)
        d.pwrite(bytes(20 * MIB), 200 * MIB)
        d.pwrite(pattern("var ", 8 * MIB), 512 * MIB)


# --------------------------------------------------------------------------------------------
# docs/howto-repair.md
# --------------------------------------------------------------------------------------------

def put(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``path`` (damage done from outside the library)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def build_repair_damaged(root: Path, specimen: Specimen) -> None:
    """``/vms/damaged/SRV01.vhdx``: 1 GiB, 1 MiB blocks, 8 MiB written; header 1 and region
    table 1 zeroed, region table 2's signature overwritten, block 1's BAT entry pointing far past
    the end of the file."""
    disk = base(folder(root, "/vms/damaged") / "SRV01.vhdx", 1 << 30, [(0, 8 * MIB, "SRV01 data ")],
                block_size=MIB)
    image = Image.open(str(disk))
    entry = image.bat_region.file_offset + 8 * image.bat_index(1)
    image.close()
    put(disk, C.HEADER1_OFFSET, bytes(4096))
    put(disk, C.REGION_TABLE1_OFFSET, bytes(4096))
    put(disk, C.REGION_TABLE2_OFFSET, b"xxxx")
    put(disk, entry, ((1 << 40) | 6).to_bytes(8, "little"))


def build_repair_crashed(root: Path, specimen: Specimen) -> None:
    """``/vms/crashed/disk.vhdx``: 64 MiB, 4 MiB written; then a 4 KiB write whose metadata
    update reached the log only (the writer stopped as a crash would stop it)."""
    path = base(folder(root, "/vms/crashed") / "disk.vhdx", 64 * MIB, [(0, 4 * MIB, "before ")])
    disk = vhdx.open(path, "r+")
    disk.pwrite(pattern("last write ", 4096), 40 * MIB)
    disk.flush()
    disk.image.writer.fail(RuntimeError("simulated crash"))
    disk.close()


def build_repair_leaked(root: Path, specimen: Specimen) -> None:
    """``/vms/leaked/disk.vhdx``: 64 MiB, 4 MiB written; header 2 damaged (one byte changed)
    and 3 MiB of zeros past the last structure, as an interrupted write leaves them."""
    path = base(folder(root, "/vms/leaked") / "disk.vhdx", 64 * MIB, [(0, 4 * MIB, "data ")])
    flip_byte(path, C.HEADER2_OFFSET + 0x100)
    os.truncate(path, path.stat().st_size + 3 * MIB)


FIXTURES: dict[str, Callable[[Path, Specimen], None]] = {
    "guide-scripts": build_guide_scripts,
    "guide-damaged": build_guide_damaged,
    "guide-lab": build_guide_lab,
    "guide-keep": build_guide_keep,
    "evidence": build_evidence,
    "old-host": build_old_host,
    "fs01": build_fs01,
    "evidence-ext4": build_evidence_ext4,
    "wsl-ext4": build_wsl_ext4,
    "repair-damaged": build_repair_damaged,
    "repair-crashed": build_repair_crashed,
    "repair-leaked": build_repair_leaked,
}
"""Every fixture a ``<!-- setup: NAME -->`` marker may name."""
