"""The guided demo behind ``vhdx demo``: the whole job on a small disk, with real checks.

Builds a base disk, writes recognisable data, takes two checkpoints with more writes,
shows the chain and the change map, merges the checkpoints back, checks and hashes the
result, and compares it with a plain in-memory model of what was written. Every check
can fail; :func:`run` returns False (and the CLI exits 1) when one does.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

from ..chains.disk import Disk
from ..chains.resolve import chain
from ..chains.resolve import open as open_disk
from .check import check_file
from .create import create, snapshot
from .maps import changed_ranges
from .merge.run import merge
from .orphans import find_chains

MiB = 1 << 20
SIZE = 48 * MiB

Say = Callable[[str], None]


def pattern(label: str, length: int) -> bytes:
    """``length`` bytes of ``label`` repeated (with a space after each), to recognise in a hex dump."""
    unit = f"{label} ".encode()
    return (unit * (length // len(unit) + 1))[:length]


def run_in(folder: str | None = None, say: Say = print) -> bool:
    """:func:`run` in ``folder`` (made if missing, kept afterwards), or in a temporary folder."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="vhdx-demo-") as temporary:
            return run(temporary, say)
    os.makedirs(folder, exist_ok=True)
    return run(folder, say)


def run(folder: str, say: Say = print) -> bool:
    """Run the demo in ``folder``, telling each step to ``say``; True when every check passed."""
    demo = Demo(folder, say)
    for step in (demo.create_base, demo.checkpoint_1, demo.checkpoint_2, demo.show_chain, demo.show_changes,
                 demo.read_through_chain, demo.find_orphans, demo.merge_back, demo.check_result):
        step()
    say("demo passed" if demo.ok else "demo FAILED")
    return demo.ok


class Demo:
    """The demo's state: its files, a model of what was written, and whether every check passed."""

    def __init__(self, folder: str, say: Say) -> None:
        self.folder = folder
        self.say = say
        self.ok = True
        self.model = bytearray(SIZE)
        self.base = os.path.join(folder, "server.vhdx")
        self.cp1 = self.cp2 = ""
        self.before = ""

    def expect(self, cond: bool, what: str) -> None:
        """Report one check; a failed one fails the demo."""
        self.say(f"   {'ok ' if cond else 'FAILED'}  {what}")
        self.ok = self.ok and cond

    def write(self, disk: Disk, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of ``disk`` and of the model."""
        disk.seek(offset)
        disk.write(data)
        self.model[offset:offset + len(data)] = data

    def create_base(self) -> None:
        """1. A dynamic base disk with data at 0-8 MiB and 20-24 MiB."""
        self.say(f"1. Create a {SIZE // MiB} MiB dynamic base disk with 2 MiB blocks: {self.base}")
        with create(self.base, SIZE, block_size=2 * MiB) as disk:
            self.write(disk, 0, pattern("BASE-SYSTEM", 8 * MiB))
            self.write(disk, 20 * MiB, pattern("BASE-DATA", 4 * MiB))
        self.say("   wrote 'BASE-SYSTEM' at 0-8 MiB and 'BASE-DATA' at 20-24 MiB")

    def checkpoint_1(self) -> None:
        """2. A checkpoint of the base, with a partial block and new data written into it."""
        self.say("2. Take checkpoint 1 (Hyper-V naming) and write into it")
        self.cp1 = snapshot(self.base)
        with open_disk(self.cp1, "r+") as disk:
            self.write(disk, 1 * MiB, pattern("CHECKPOINT-1", 512 * 1024))       # inside a block: partial
            self.write(disk, 30 * MiB, pattern("CHECKPOINT-1-NEW", 3 * MiB))     # new data
        self.say(f"   {os.path.basename(self.cp1)}: 512 KiB over the base at 1 MiB, 3 MiB of new data at 30 MiB")

    def checkpoint_2(self) -> None:
        """3. A checkpoint of checkpoint 1, with a few sectors and an unaligned write."""
        self.say("3. Take checkpoint 2 on top of checkpoint 1 and write into it")
        self.cp2 = snapshot(self.cp1)
        with open_disk(self.cp2, "r+") as disk:
            self.write(disk, 1 * MiB + 4096, pattern("CHECKPOINT-2", 8192))      # two sectors inside cp1's change
            self.write(disk, 21 * MiB + 100, b"unaligned write in checkpoint 2")  # not sector aligned
        self.say(f"   {os.path.basename(self.cp2)}: 8 KiB at 1 MiB + 4 KiB, 31 unaligned bytes at 21 MiB + 100")

    def show_chain(self) -> None:
        """4. The chain of checkpoint 2: three layers, every link matching."""
        self.say("4. The chain, as `vhdx chain` shows it")
        ch = chain(self.cp2)
        for depth, layer in enumerate(ch.layers):
            self.say(f"   {'  ' * depth}{os.path.basename(layer.path)} [{layer.disk_type}]"
                     + (f" found by {layer.found_by}" if depth else ""))
        self.expect(ch.complete and len(ch.layers) == 3,
                    "three layers, every link matches its parent's DataWriteGuid")

    def show_changes(self) -> None:
        """5. What each checkpoint changed; checkpoint 2 holds exactly what it wrote."""
        self.say("5. What each checkpoint changed, as `vhdx diff` shows it")
        for path in (self.cp1, self.cp2):
            with open_disk(path) as disk:
                ranges = changed_ranges(disk.image)
            total = sum(r.length for r in ranges)
            self.say(f"   {os.path.basename(path)}: {total // 512} sectors in {len(ranges)} ranges: "
                     + ", ".join(f"{r.start // 512}+{r.length // 512}" for r in ranges))
        with open_disk(self.cp2) as disk:
            changed = sum(r.length for r in changed_ranges(disk.image))
        self.expect(changed == 8192 + 512, "checkpoint 2 holds exactly the 16 sectors + 1 edge sector it wrote")

    def read_through_chain(self) -> None:
        """Reading checkpoint 2 through its chain gives the model."""
        with open_disk(self.cp2) as disk:
            self.before = hashlib.sha256(disk.read()).hexdigest()
        expected = hashlib.sha256(self.model).hexdigest()
        self.expect(self.before == expected,
                    f"reading through the chain gives what was written (sha256 {self.before[:16]}...)")

    def find_orphans(self) -> None:
        """The folder holds one chain, whose leaf is checkpoint 2."""
        forest = find_chains(self.folder)
        self.expect([os.path.basename(n.path) for n in forest.leaves] == [os.path.basename(self.cp2)],
                    "`vhdx orphans` finds one chain whose leaf is checkpoint 2")

    def merge_back(self) -> None:
        """6. Both checkpoints merged into the base, and deleted."""
        self.say("6. Merge both checkpoints into the base, as `vhdx merge CP2 --into BASE` does")
        result = merge(self.cp2, self.base)
        self.say(f"   copied {result.bytes_copied} bytes in {result.seconds:.2f} s; deleted "
                 + ", ".join(os.path.basename(p) for p in result.deleted))
        self.expect(not os.path.exists(self.cp1) and not os.path.exists(self.cp2),
                    "the merged checkpoints are gone")

    def check_result(self) -> None:
        """7. The merged base checks clean and reads as checkpoint 2 did."""
        self.say("7. Check and hash the merged base")
        report = check_file(self.base)
        self.expect(not report.errors, f"`vhdx check` finds no errors ({len(report.findings)} notes)")
        with open_disk(self.base) as disk:
            after = hashlib.sha256(disk.read()).hexdigest()
        self.expect(after == self.before,
                    f"the base now reads exactly as the last checkpoint did (sha256 {after[:16]}...)")
