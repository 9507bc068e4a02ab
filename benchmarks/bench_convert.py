#!/usr/bin/env python3
"""Convert and compact speed of vhdx against ``qemu-img convert`` and ``cp``.

    python benchmarks/bench_convert.py [--size 4G] [--rounds 5] [--workdir DIR] [--json] [--keep]

Built once (not timed):

* ``src.raw``: a raw image of ``--size`` in which every other 32 MiB chunk holds random data and
  the others hold zeros written as data (a dense file: both tools must read the zeros to find
  them), so half the image is zeros;
* ``holey.vhdx``: a dynamic VHDX of ``--size`` with 32 MiB blocks, every block written, every
  other block with zeros (the state a guest leaves after zeroing its free space);
* ``payload.raw``: a raw file of as many bytes as the compact moves.

The library is byte-compiled first (``compileall``), as an installed package is: with
``PYTHONDONTWRITEBYTECODE`` set and no ``__pycache__``, every run would compile some 60 modules
(about 0.1 s) before doing anything.

Timed, every input read just before (a warm page cache, as for a file in use), in ``--rounds``
alternating rounds of the two converts and of compact and ``cp`` (the machine may be shared:
medians of the wall and of the CPU time, user + system, are printed):

* ``convert ours``: ``python -m vhdx convert --from raw --dynamic src.raw ours.vhdx`` (a child
  process, start-up included, output synced and renamed into place);
* ``convert qemu-img``: ``qemu-img convert -f raw -O vhdx -o subformat=dynamic,block_size=32M
  src.raw qemu.vhdx`` and then ``sync qemu.vhdx``: qemu-img's convert does not flush its output
  (its fdatasyncs come while it creates the file; when it exits, the 2 GiB of a 4 GiB run are
  still dirty in the page cache, measured in /proc/meminfo), where ours is durable when it returns;
  its time without the ``sync`` is printed too, not compared;
* ``compact ours``: ``python -m vhdx compact work.vhdx`` (start-up included) on a fresh dense
  copy of ``holey.vhdx`` (``cp --sparse=never``, not timed); it reads every block to find the
  zero ones, moves the blocks at the end into the holes, syncs and cuts;
* ``cp``: ``cp --reflink=never payload.raw copy.raw`` plus ``sync`` of the copy: the bytes the
  compact moved.

Checks: both converted files read the same virtual disk as the source (``qemu-img compare``),
and the compacted disk still does (SHA-256 through ``vhdx hash`` before and after). Prints the
times and the speed ratios qemu-img/ours and cp/ours (above 1: ours is faster; the goals are 1.0
and 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_size  # noqa: E402

import vhdx  # noqa: E402

MiB = 1 << 20
CHUNK = 32 * MiB


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(args, env=env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed: {r.stdout}{r.stderr}")
    return elapsed


def timed_cpu(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of a child process: user + system time, its children included."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(args)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The medians of the wall and of the CPU times."""
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def warm(path: Path) -> None:
    """Read ``path`` once so that every timed run starts from a warm page cache."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def build(work: Path, size: int) -> None:
    data = os.urandom(CHUNK)
    zeros = bytes(CHUNK)
    with open(work / "src.raw", "wb") as f:
        for i in range(size // CHUNK):
            f.write(data if i % 2 == 0 else zeros)
    with vhdx.create(work / "holey.vhdx", size, block_size=CHUNK) as d:
        for i in range(size // CHUNK):
            d.pwrite(data if i % 2 == 0 else zeros, i * CHUNK)
    os.sync()


def bench_convert(work: Path, rounds: int, py: str, qemu_img: str) -> dict[str, float | str]:
    """Rounds of our convert, qemu-img's with a sync of its output and qemu-img's alone (in turns),
    each from a warm source into a new file (removed and synced away before the next round);
    medians of wall and CPU time."""
    ours, peer, unflushed, out = [], [], [], {}
    qemu = [qemu_img, "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=32M",
            str(work / "src.raw"), str(work / "qemu.vhdx")]
    commands = {"ours.vhdx": [py, "-m", "vhdx", "convert", "--no-progress", "--from", "raw", "--dynamic",
                              str(work / "src.raw"), str(work / "ours.vhdx")],
                "qemu.vhdx": ["sh", "-c", f"{shlex.join(qemu)} && {shlex.join(['sync', str(work / 'qemu.vhdx')])}"],
                "unflushed": qemu}
    order = [("ours.vhdx", ours), ("qemu.vhdx", peer), ("unflushed", unflushed)]
    for k in range(rounds):
        for name, times in order[k % 3:] + order[:k % 3]:
            (work / ("qemu.vhdx" if name == "unflushed" else name)).unlink(missing_ok=True)
            os.sync()   # also writes out what an unflushed run left, untimed
            warm(work / "src.raw")
            times.append(timed_cpu(commands[name]))
    for name in ("ours.vhdx", "qemu.vhdx"):
        r = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "vhdx", str(work / "src.raw"), str(work / name)],
                           capture_output=True, text=True)
        out[f"compare_{name}"] = "identical" if r.returncode == 0 else (r.stdout + r.stderr).strip()
    out["convert_ours_s"], out["convert_ours_cpu_s"] = median_pair(ours)
    out["convert_qemu_s"], out["convert_qemu_cpu_s"] = median_pair(peer)
    out["convert_qemu_unflushed_s"] = statistics.median(w for w, _ in unflushed)
    out["convert_runs"] = " ".join(f"{a:.2f}/{b:.2f}" for (a, _), (b, _) in zip(ours, peer))
    return out


def bench(work: Path, size: int, rounds: int) -> dict[str, float | str]:
    py = sys.executable
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        sys.exit("qemu-img is needed (apt-get install qemu-utils)")
    out: dict[str, float | str] = {}
    subprocess.run([py, "-m", "compileall", "-q", str(REPO / "vhdx")], check=True)
    out.update(bench_convert(work, rounds, py, qemu_img))
    before = vhdx.hash(work / "holey.vhdx")
    result = vhdx.compact(work / "holey.vhdx", dry_run=True)
    moved = result.bytes_moved
    with open(work / "payload.raw", "wb") as f:
        f.write(os.urandom(CHUNK) * (moved // CHUNK))
    os.sync()
    ours, peer = [], []
    for _ in range(rounds):    # alternating: a fresh dense copy of the disk each round (not timed)
        subprocess.run(["cp", "--reflink=never", "--sparse=never", str(work / "holey.vhdx"), str(work / "work.vhdx")],
                       check=True)
        os.sync()
        warm(work / "work.vhdx")
        ours.append(timed_cpu([py, "-m", "vhdx", "compact", "--no-progress", str(work / "work.vhdx")]))
        warm(work / "payload.raw")
        copy = shlex.join(["cp", "--reflink=never", str(work / "payload.raw"), str(work / "copy.raw")])
        peer.append(timed_cpu(["sh", "-c", f"{copy} && {shlex.join(['sync', str(work / 'copy.raw')])}"]))
        os.unlink(work / "copy.raw")
    out["compact_ours_s"], out["compact_ours_cpu_s"] = median_pair(ours)
    out["cp_moved_s"], out["cp_moved_cpu_s"] = median_pair(peer)
    out["compact_rounds"] = rounds
    out["compact_bytes_moved"] = moved
    out["compact_reclaimed"] = result.bytes_reclaimed
    out["compact_same_content"] = "yes" if vhdx.hash(work / "work.vhdx") == before else "NO"
    out["convert_speed_vs_qemu"] = out["convert_qemu_s"] / out["convert_ours_s"]  # type: ignore[operator]
    out["compact_speed_vs_cp"] = out["cp_moved_s"] / out["compact_ours_s"]  # type: ignore[operator]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--workdir")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of convert / qemu-img and of compact / cp (medians; default 5)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building {args.size} in {work} ...", file=sys.stderr)
        build(work, size)
        out = bench(work, size, args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    print(f"convert {args.size} raw (half zeros) -> dynamic VHDX, medians of {args.rounds} alternating rounds: ours "
          f"{out['convert_ours_s']:.2f} s (CPU {out['convert_ours_cpu_s']:.2f} s), qemu-img {out['convert_qemu_s']:.2f} s "
          f"(CPU {out['convert_qemu_cpu_s']:.2f} s; without its sync {out['convert_qemu_unflushed_s']:.2f} s; runs "
          f"ours/qemu {out['convert_runs']}): speed ours/qemu-img "
          f"{out['convert_speed_vs_qemu']:.2f} "
          f"(goal >= 1.0); compare: ours {out['compare_ours.vhdx']}, qemu {out['compare_qemu.vhdx']}")
    print(f"compact {args.size} (half its blocks zeros), medians of {args.rounds} alternating rounds: ours "
          f"{out['compact_ours_s']:.2f} s (CPU {out['compact_ours_cpu_s']:.2f} s), cp of the "
          f"{int(out['compact_bytes_moved']) // MiB} MiB moved {out['cp_moved_s']:.2f} s (CPU "
          f"{out['cp_moved_cpu_s']:.2f} s): speed ours/cp "
          f"{out['compact_speed_vs_cp']:.2f} (goal >= 0.8); reclaimed {int(out['compact_reclaimed']) // MiB} MiB, "
          f"same content: {out['compact_same_content']}")


if __name__ == "__main__":
    main()
