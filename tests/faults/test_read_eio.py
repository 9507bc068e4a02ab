"""A real read error under the read paths that map the file (issue 10's fast misaligned reads).

Storage-level fault injection (:mod:`support.faults`) wraps ``Storage`` calls; a read into a
buffer the kernel copies into slowly is instead copied from a memory map of the file, where
an unreadable page would raise SIGBUS and kill the process. These tests serve a disk through a
FUSE file system whose reads of one block fail with EIO (:mod:`support.eiofs`), and read it in
a child process: the read must end in one :class:`VhdxError` naming the file and an offset in
the failing range, and the process must live; the other blocks read right, through the map.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vhdx
from support.disk import MiB, pattern, sha256
from support.mounting import eio_mounted
from vhdx.format import constants as C

READER = """
import mmap, sys, hashlib
import vhdx
from vhdx.file.storage import FileStorage
results = []
real = FileStorage.copy_mapped
def spy(self, *args):
    done = real(self, *args)
    results.append(done)
    return done
FileStorage.copy_mapped = spy
m = mmap.mmap(-1, 2 << 20)
view = memoryview(m)[16:16 + (1 << 20)]   # 16 bytes past a page: the slow case, which maps
with vhdx.open(sys.argv[1]) as disk:
    try:
        disk.pread_into(view, int(sys.argv[2]))
    except vhdx.VhdxError as e:
        print("ERROR", e.offset, results, e)
        sys.exit(3)
print("OK", hashlib.sha256(view).hexdigest(), results)
"""


def _disk(folder: Path) -> tuple[Path, list[int]]:
    """A 4 MiB disk, 1 MiB blocks, all four written; and each block's offset in the file."""
    path = folder / "d.vhdx"
    with vhdx.create(str(path), 4 * MiB, block_size=MiB) as disk:
        for block in range(4):
            disk.pwrite(pattern(block, MiB), block * MiB)
    with vhdx.open(str(path)) as disk:
        image = disk.image
        offsets = [int(image.bat[image.bat_index(b)]) & C.BAT_FILE_OFFSET_MASK for b in range(4)]
    return path, offsets


def _read(served: Path, offset: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", READER, str(served), str(offset)], capture_output=True,
                          text=True, timeout=120)


def test_an_unreadable_block_is_one_error_not_a_crash(tmp_path: Path) -> None:
    path, offsets = _disk(tmp_path)
    lo = offsets[2] + 256 * 1024
    with eio_mounted(path, tmp_path / "mnt", lo, lo + 4096) as served:
        bad = _read(served, 2 * MiB)
        good = _read(served, 1 * MiB)
    assert bad.returncode == 3, f"the read of the failing block ended with {bad.returncode}: {bad.stdout}{bad.stderr}"
    words = bad.stdout.split()
    assert words[0] == "ERROR" and offsets[2] <= int(words[1]) < offsets[2] + MiB, bad.stdout
    assert "[False]" in bad.stdout, f"the map should have been tried and refused: {bad.stdout}"
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.split()[1] == sha256(pattern(1, MiB)), good.stdout
    assert "[True]" in good.stdout, f"the good block should be copied from the map: {good.stdout}"
