"""Chains whose layers hold real file systems: made with mkfs.ext4 / mkfs.fat / mkntfs / mkfs.exfat,
changed through a kernel (ext4), ntfs-3g (NTFS) or exfat-fuse (exFAT: no kernel exfat module needed)
mount of a raw image or mtools (FAT: no vfat module needed), and written layer by layer into a VHDX chain,
each checkpoint holding exactly the sectors that changed. Needs root (loop mounts); a missing
tool skips the test, or fails it under CI=true."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vhdx
from support.needs import need

MiB = 1 << 20
SECTOR = 512
PART_OFFSET = MiB            # the partition starts at LBA 2048
MKFS = {"ext4": (["mkfs.ext4", "-q", "-F"], "e2fsprogs"), "fat": (["mkfs.fat"], "dosfstools"),
        "ntfs": (["mkntfs", "-q", "-F", "-f"], "ntfs-3g"), "exfat": (["mkfs.exfat"], "exfatprogs")}
MOUNT = {"ext4": ["-t", "ext4", "-o", "loop,noatime"], "ntfs": ["-t", "ntfs-3g", "-o", "noatime"],
         "exfat": ["-t", "exfat-fuse", "-o", "loop,noatime"]}
MBR_TYPE = {"ext4": 0x83, "fat": 0x0E, "ntfs": 0x07, "exfat": 0x07}


def require(fs: str) -> None:
    """Root (for loop mounts), the mkfs tool of ``fs`` and pytsk3."""
    need(os.geteuid() == 0, "loop mounts need root")
    tool, package = MKFS[fs]
    if fs == "fat":
        need(bool(shutil.which("mcopy")), "mcopy is missing: apt-get install mtools")
    if fs == "exfat":   # a FUSE mount: the kernel's exfat module is often absent
        need(bool(shutil.which("mount.exfat-fuse", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")),
             "mount.exfat-fuse is missing: apt-get install exfat-fuse")
        need(os.path.exists("/dev/fuse"), "/dev/fuse is missing: exFAT is written through exfat-fuse")
    need(bool(shutil.which(tool[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")),
          f"{tool[0]} is missing: apt-get install {package}")
    try:
        import pytsk3
        del pytsk3
    except ImportError:
        need(False, "pytsk3 is missing: pip install 'vhdx[forensics]'")


def _run(*argv: str) -> None:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


# --------------------------------------------------------------------------- partition tables

def mbr(fs: str, start: int, sectors: int) -> bytes:
    """A sector 0 with one primary partition."""
    sector = bytearray(SECTOR)
    sector[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", MBR_TYPE[fs], b"\xfe\xff\xff", start, sectors)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt(disk_sectors: int, start: int, sectors: int) -> tuple[bytes, bytes]:
    """(LBA 0..33, the last 33 sectors): protective MBR, GPT headers and one basic-data partition."""
    entries = bytearray(128 * 128)
    entries[0:128] = struct.pack("<16s16sQQQ72s", uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7").bytes_le,
                                 uuid.uuid4().bytes_le, start, start + sectors - 1, 0,
                                 "data".encode("utf-16-le").ljust(72, b"\0"))
    last = disk_sectors - 1
    disk_guid = uuid.uuid4().bytes_le

    def header(current: int, backup: int, table: int) -> bytes:
        h = bytearray(struct.pack("<8sIII4sQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, b"\0" * 4, current, backup,
                                  34, last - 33, disk_guid, table, 128, 128, zlib.crc32(entries)))
        h[16:20] = struct.pack("<I", zlib.crc32(bytes(h)))
        return bytes(h).ljust(SECTOR, b"\0")

    protective = bytearray(SECTOR)
    protective[446:462] = struct.pack("<B3sB3sII", 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1, min(last, 0xFFFFFFFF))
    protective[510:512] = b"\x55\xaa"
    head = bytes(protective) + header(1, last, 2) + bytes(entries)
    tail = bytes(entries) + header(last, 1, last - 32)
    return head, tail


# --------------------------------------------------------------------------- the file system and its changes

@dataclass
class Step:
    """What one checkpoint does to the file system, and what diff --files must therefore say."""

    ops: list[tuple[str, str, bytes]]
    created: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)


def _mounted_op(root: Path, op: str, path: str, data: bytes) -> None:
    target = root / path.lstrip("/")
    if op == "mkdir":
        target.mkdir()
    elif op in ("write", "append"):
        with open(target, "ab" if op == "append" else "wb") as f:
            f.write(data)
    elif op == "overwrite":   # in place, same size
        with open(target, "r+b") as f:
            f.write(data)
    elif op == "delete":
        target.unlink()
    elif op == "rename":    # data: the new path
        target.rename(root / data.decode().lstrip("/"))
    else:
        raise ValueError(op)


def _mtools_op(image: Path, op: str, path: str, data: bytes) -> None:
    """FAT through mtools (no kernel vfat needed): the same operations, whole-file rewrites."""
    where = f"::{path}"
    if op == "mkdir":
        _run("mmd", "-i", str(image), where)
    elif op == "delete":
        _run("mdel", "-i", str(image), where)
    elif op == "rename":
        _run("mren", "-i", str(image), where, f"::{data.decode()}")
    else:
        local = image.with_name("mtools.tmp")
        if op == "write":
            content = data
        else:
            _run("mcopy", "-n", "-i", str(image), where, str(local))
            old = local.read_bytes()
            content = old + data if op == "append" else data + old[len(data):]
        local.write_bytes(content)
        _run("mcopy", "-o", "-i", str(image), str(local), where)
        local.unlink()


def expect(step: Step, op: str, path: str, existing: set[str], data: bytes = b"") -> None:
    """Keep ``step``'s expected sets in step with one operation (a rename is the old path
    deleted and the new one created)."""
    if op == "rename":
        expect(step, "delete", path, existing)
        expect(step, "write", data.decode(), existing)
        return
    if op == "delete":
        existing.discard(path)
        if path in step.created:
            step.created.discard(path)
        else:
            step.deleted.add(path)
    elif path not in existing:
        existing.add(path)
        step.created.add(path)
    elif path not in step.created:
        step.changed.add(path)


def apply(fs: str, image: Path, mnt: Path, step: Step, existing: set[str]) -> None:
    """Run ``step`` on the file system in ``image`` (mounted at ``mnt``, or through mtools for FAT)."""
    if fs == "fat":
        for op, path, data in step.ops:
            _mtools_op(image, op, path, data)
            expect(step, op, path, existing, data)
        return
    _run("mount", *MOUNT[fs], str(image), str(mnt))
    try:
        for op, path, data in step.ops:
            _mounted_op(mnt, op, path, data)
            expect(step, op, path, existing, data)
    finally:
        _run("umount", str(mnt))


@dataclass
class FsChain:
    """The built chain: layer files base first, and the Steps its checkpoints made."""

    paths: list[Path]
    steps: list[Step]


def _sectors_that_differ(old: bytes, new: bytes) -> list[tuple[int, int]]:
    a = np.frombuffer(old, dtype=np.uint8).reshape(-1, SECTOR)
    b = np.frombuffer(new, dtype=np.uint8).reshape(-1, SECTOR)
    bad = (a != b).any(axis=1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bad, [0]))))
    return [(int(s) * SECTOR, int(e - s) * SECTOR) for s, e in zip(edges[::2], edges[1::2])]


def build(folder: Path, fs: str, table: str, steps: list[Step], fs_size: int = 40 * MiB,
          names: list[str] | None = None) -> FsChain:
    """mkfs, the base's files (``steps[0]``), then one checkpoint per further step (named
    ``names[n]`` if given, else base.vhdx and what ``vhdx.snapshot`` names them)."""
    folder.mkdir(parents=True, exist_ok=True)
    image, mnt = folder / "fs.raw", folder / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(fs_size)
    _run(*MKFS[fs][0], str(image))
    offset = 0 if table == "none" else PART_OFFSET
    size = offset + fs_size + (MiB if table == "gpt" else 0)
    head, tail = b"", b""
    if table == "mbr":
        head = mbr(fs, offset // SECTOR, fs_size // SECTOR)
    elif table == "gpt":
        head, tail = gpt(size // SECTOR, offset // SECTOR, fs_size // SECTOR)
    existing: set[str] = set()
    paths: list[Path] = []
    previous = bytes(size)
    for n, step in enumerate(steps):
        apply(fs, image, mnt, step, existing)
        raw = bytearray(size)
        raw[:len(head)] = head
        raw[offset:offset + fs_size] = image.read_bytes()
        if tail:
            raw[size - len(tail):] = tail
        if n == 0:
            paths.append(folder / (names[0] if names else "base.vhdx"))
            disk = vhdx.create(paths[0], size, block_size=MiB)
        elif names:
            paths.append(folder / names[n])
            disk = vhdx.create(paths[-1], parent=paths[-2])
        else:
            paths.append(Path(vhdx.snapshot(paths[-1])))
            disk = vhdx.open(paths[-1], "r+")
        with disk:
            for at, length in _sectors_that_differ(previous, bytes(raw)):
                disk.pwrite(memoryview(raw)[at:at + length], at)
        previous = bytes(raw)
    return FsChain(paths, steps)
