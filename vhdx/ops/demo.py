"""The guided demo behind ``vhdx demo``: the whole job on a small disk, with real checks.

Builds a base disk, writes recognisable data, takes two checkpoints with more writes,
shows the chain and the change map, merges the checkpoints back, checks and hashes the
result, and compares it with a plain in-memory model of what was written. Every check
can fail; :func:`run` returns False (and the CLI exits 1) when one does.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

from ..chains.resolve import chain
from ..chains.resolve import open as open_disk
from .check import check_file
from .create import create, snapshot
from .maps import changed_ranges
from .merge.run import merge
from .orphans import find_chains

MiB = 1 << 20
SIZE = 48 * MiB


def _pattern(label: str, length: int) -> bytes:
    unit = f"{label} ".encode()
    return (unit * (length // len(unit) + 1))[:length]


def run(folder: str, say: Callable[[str], None] = print) -> bool:
    ok = True

    def expect(cond: bool, what: str) -> None:
        nonlocal ok
        say(f"   {'ok ' if cond else 'FAILED'}  {what}")
        ok = ok and cond

    model = bytearray(SIZE)

    def write(disk, offset: int, data: bytes) -> None:
        disk.seek(offset)
        disk.write(data)
        model[offset:offset + len(data)] = data

    base = os.path.join(folder, "server.vhdx")
    say(f"1. Create a {SIZE // MiB} MiB dynamic base disk with 2 MiB blocks: {base}")
    with create(base, SIZE, block_size=2 * MiB) as disk:
        write(disk, 0, _pattern("BASE-SYSTEM", 8 * MiB))
        write(disk, 20 * MiB, _pattern("BASE-DATA", 4 * MiB))
    say("   wrote 'BASE-SYSTEM' at 0-8 MiB and 'BASE-DATA' at 20-24 MiB")

    say("2. Take checkpoint 1 (Hyper-V naming) and write into it")
    cp1 = snapshot(base)
    with open_disk(cp1, "r+") as disk:
        write(disk, 1 * MiB, _pattern("CHECKPOINT-1", 512 * 1024))       # inside a block: partial
        write(disk, 30 * MiB, _pattern("CHECKPOINT-1-NEW", 3 * MiB))     # new data
    say(f"   {os.path.basename(cp1)}: 512 KiB over the base at 1 MiB, 3 MiB of new data at 30 MiB")

    say("3. Take checkpoint 2 on top of checkpoint 1 and write into it")
    cp2 = snapshot(cp1)
    with open_disk(cp2, "r+") as disk:
        write(disk, 1 * MiB + 4096, _pattern("CHECKPOINT-2", 8192))      # two sectors inside cp1's change
        write(disk, 21 * MiB + 100, b"unaligned write in checkpoint 2")  # not sector aligned
    say(f"   {os.path.basename(cp2)}: 8 KiB at 1 MiB + 4 KiB, 31 unaligned bytes at 21 MiB + 100")

    say("4. The chain, as `vhdx chain` shows it")
    ch = chain(cp2)
    for depth, layer in enumerate(ch.layers):
        say(f"   {'  ' * depth}{os.path.basename(layer.path)} [{layer.disk_type}]"
            + (f" found by {layer.found_by}" if depth else ""))
    expect(ch.complete and len(ch.layers) == 3, "three layers, every link matches its parent's DataWriteGuid")

    say("5. What each checkpoint changed, as `vhdx diff` shows it")
    for path in (cp1, cp2):
        with open_disk(path) as disk:
            ranges = changed_ranges(disk.image)
        total = sum(r.length for r in ranges)
        say(f"   {os.path.basename(path)}: {total // 512} sectors in {len(ranges)} ranges: "
            + ", ".join(f"{r.start // 512}+{r.length // 512}" for r in ranges))
    with open_disk(cp2) as disk:
        changed = sum(r.length for r in changed_ranges(disk.image))
    expect(changed == 8192 + 512, "checkpoint 2 holds exactly the 16 sectors + 1 edge sector it wrote")

    with open_disk(cp2) as disk:
        before = hashlib.sha256(disk.read()).hexdigest()
    expected = hashlib.sha256(model).hexdigest()
    expect(before == expected, f"reading through the chain gives what was written (sha256 {before[:16]}...)")

    forest = find_chains(folder)
    expect([os.path.basename(n.path) for n in forest.leaves] == [os.path.basename(cp2)],
           "`vhdx orphans` finds one chain whose leaf is checkpoint 2")

    say("6. Merge both checkpoints into the base, as `vhdx merge CP2 --into BASE` does")
    result = merge(cp2, base)
    say(f"   copied {result.bytes_copied} bytes in {result.seconds:.2f} s; deleted "
        + ", ".join(os.path.basename(p) for p in result.deleted))
    expect(not os.path.exists(cp1) and not os.path.exists(cp2), "the merged checkpoints are gone")

    say("7. Check and hash the merged base")
    report = check_file(base)
    expect(not report.errors, f"`vhdx check` finds no errors ({len(report.findings)} notes)")
    with open_disk(base) as disk:
        after = hashlib.sha256(disk.read()).hexdigest()
    expect(after == before, f"the base now reads exactly as the last checkpoint did (sha256 {after[:16]}...)")
    say("demo passed" if ok else "demo FAILED")
    return ok
