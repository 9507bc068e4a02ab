#!/usr/bin/env python3
"""Cost at the largest size the format allows: 64 TiB dynamic disks, ours against qemu-img and libvhdi.

For each block size (1 MiB: a 512 MiB BAT; 32 MiB: a 16 MiB BAT) it times, each in a child
process whose peak RSS is taken from ``os.wait4``:

  create      ``python -m vhdx create F 64T --block-size B``  vs  ``qemu-img create -f vhdx``
  info        ``python -m vhdx info F``                       vs  ``qemu-img info F``
  check       ``python -m vhdx check F``                      vs  ``qemu-img check F``
  open+tail   ``vhdx.open(F).pread(size - 4096, 4096)``       vs  pyvhdi ``open`` + ``read_buffer_at_offset``
              (timed inside the child, after the imports: the library's own cost; the RSS
              is the whole child's). ``first``: the child's first open; ``warm``: the median of
              20 more in the same child, ours with its parse cache cleared before each)

``info``/``check``/``open+tail`` run on the disk our ``create`` made and, as ``q-`` rows, on
the one qemu-img made (qemu writes its BAT in full, every entry ZERO; ours leaves it a hole).
``(CLI)`` rows time the whole command, Python start-up and imports included (about 0.2 s of
CPU: see bench_read's startup row); ``(library)`` rows time the call inside a child that has
already imported vhdx, against the whole qemu-img command. Each row is the median of
``--rounds`` runs (the open+tail and chain rows: of ``--open-rounds`` runs, ours and the
peer's taking turns; ``--only-open`` runs just those); the ratio is ours / peer (time and RSS).
Goals (issue 10): open + tail read at most 2 x pyvhdi and under 64 MiB RSS; check at most 1.0 x
qemu-img in time with at most a quarter of its memory; create at most 1.0 x qemu-img. The disks
are sparse: they take a few MiB of the work folder.

Then (round 6) the maintenance verbs on a 64 TiB disk with 1 MiB blocks holding eight 4 KiB
pieces and a block of zeros, as CLI commands in sequence each round (compact --dry-run, resize
to 32 TiB and back, compact, convert, repair to a copy, check): time and peak RSS, no peer
(qemu-img cannot compact or resize a VHDX).

    python benchmarks/bench_scale.py [--rounds 5] [--open-rounds 11] [--only-open | --only-maintenance] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 64 << 40
PY = sys.executable

OPEN_OURS = """
import statistics, sys, time
import vhdx
import vhdx.chains.resolve, vhdx.file.image, vhdx.chains.disk  # import vhdx is lazy: load what open uses before timing
from vhdx.file import parsecache
def once():
    t = time.perf_counter()
    with vhdx.open(sys.argv[1]) as d:
        data = d.pread(d.size - 4096, 4096)
    return time.perf_counter() - t
print("ELAPSED", once())
warm = []
for _ in range(20):
    parsecache.clear()  # parse again: no help from the earlier opens
    warm.append(once())
print("WARM", statistics.median(warm))
"""

LIB_OURS = """
import sys, time
import vhdx
import vhdx.chains.resolve, vhdx.file.image, vhdx.chains.disk  # import vhdx is lazy: load what open uses before timing
from vhdx.file.image import Image
from vhdx.ops.check import check_file
verb, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if verb == "create":
    vhdx.create(path, 64 << 40, block_size=int(sys.argv[3])).close()
elif verb == "info":
    image = Image.open(path)
    image.info()
    image.close()
else:
    check_file(path)
print("ELAPSED", time.perf_counter() - t)
"""

OPEN_PYVHDI = """
import statistics, sys, time
import pyvhdi
def once():
    t = time.perf_counter()
    f = pyvhdi.file()
    f.open(sys.argv[1])
    data = f.read_buffer_at_offset(4096, f.get_media_size() - 4096)
    f.close()
    return time.perf_counter() - t
print("ELAPSED", once())
print("WARM", statistics.median([once() for _ in range(20)]))
"""


def _child_wait4(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[float, float, int, str]:
    """Run ``cmd`` (in ``cwd``): (wall seconds, seconds it prints last on stdout or wall, peak RSS
    bytes, stdout). A ``python -c`` child imports from its working folder first: run it in ``REPO``."""
    r, w = os.pipe()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if cwd is not None:
            os.chdir(cwd)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(r)
        os.execvpe(cmd[0], cmd, env)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) not in (0, 3):  # 3: vhdx check found only a leak
        raise RuntimeError(f"{cmd} failed with status {status}")
    out = b"".join(chunks).decode()
    reported = wall
    for line in out.splitlines():
        if line.startswith("ELAPSED "):
            reported = float(line.split()[1])
    return wall, reported, usage.ru_maxrss * 1024, out


def measure(cmd: list[str], rounds: int, before=None) -> dict[str, float]:
    """Median time (reported by the child when it prints one) and peak RSS of ``rounds`` runs."""
    return measure_side_by_side([cmd], rounds, before)[0]


def measure_side_by_side(cmds: list[list[str]], rounds: int, before=None) -> list[dict[str, float]]:
    """:func:`measure` of each command, the commands taking turns round by round (so that a busy
    moment of a shared machine falls on all of them); each child imports from ``REPO``."""
    runs: list[dict[str, list]] = [{"times": [], "rss": [], "warm": []} for _ in cmds]
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    for _ in range(rounds):
        for cmd, run in zip(cmds, runs):
            if before is not None:
                before()
            _wall, reported, peak, out = _child_wait4(cmd, env, cwd=str(REPO))
            run["times"].append(reported)
            run["rss"].append(peak)
            run["warm"] += [float(line.split()[1]) for line in out.splitlines() if line.startswith("WARM ")]
    found = []
    for run in runs:
        one = {"seconds": statistics.median(run["times"]), "rss": statistics.median(run["rss"])}
        if run["warm"]:
            one["warm"] = statistics.median(run["warm"])
        found.append(one)
    return found


CHAIN_OURS = """
import sys, time
import vhdx
import vhdx.chains.resolve, vhdx.file.image, vhdx.chains.disk  # import vhdx is lazy: load what open uses before timing
t = time.perf_counter()
with vhdx.open(sys.argv[1]) as d:
    d.pread(0, 4096)
first = time.perf_counter() - t
t = time.perf_counter()
with vhdx.open(sys.argv[1]) as d:
    d.pread(0, 4096)
print("ELAPSED", first)
print("AGAIN", time.perf_counter() - t)
"""

CHAIN_PYVHDI = """
import os, sys, time
import pyvhdi
t = time.perf_counter()
files = [pyvhdi.file()]
files[0].open(sys.argv[1])
while files[-1].get_parent_filename():
    name = files[-1].get_parent_filename().replace("\\\\", "/").split("/")[-1]
    parent = pyvhdi.file()
    parent.open(os.path.join(os.path.dirname(sys.argv[1]), name))
    files[-1].set_parent(parent)
    files.append(parent)
files[0].read_buffer_at_offset(4096, 0)
print("ELAPSED", time.perf_counter() - t)
"""


def chain_rows(workdir: Path, rounds: int) -> list[dict]:
    """A 64-deep chain (1 GiB, 1 MiB blocks): open it and read 4 KiB, first and again in one process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = ("import sys, vhdx\np = sys.argv[1]\nwith vhdx.create(p, 1 << 30, block_size=1 << 20) as d:\n"
            "    d.pwrite(b'x' * 4096, 0)\nfor _ in range(63):\n    p = vhdx.snapshot(p)\nprint(p)\n")
    leaf = subprocess.run([PY, "-c", code, str(workdir / "chain.vhdx")], env=env, cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    firsts, agains, rss, peers, peer_rss = [], [], [], [], []
    for _ in range(rounds):  # ours and the peer take turns
        _w, first, peak, out = _child_wait4([PY, "-c", CHAIN_OURS, leaf], env, cwd=str(REPO))
        firsts.append(first)
        agains.append(float(out.split("AGAIN")[1]))
        rss.append(peak)
        _w, seconds, peak, _out = _child_wait4([PY, "-c", CHAIN_PYVHDI, leaf], env, cwd=str(REPO))
        peers.append(seconds)
        peer_rss.append(peak)
    peer = {"seconds": statistics.median(peers), "rss": statistics.median(peer_rss)}
    rows = []
    for name, seconds in (("64-deep chain: open (first)", statistics.median(firsts)),
                          ("64-deep chain: open (again)", statistics.median(agains))):
        rows.append({"work": name, "ours_s": seconds, "ours_rss": statistics.median(rss), "peer": "pyvhdi",
                     "peer_s": peer["seconds"], "peer_rss": peer["rss"], "time_ratio": seconds / peer["seconds"],
                     "rss_ratio": statistics.median(rss) / peer["rss"]})
    return rows


def rows_for(workdir: Path, block: int, rounds: int, open_rounds: int, only_open: bool = False) -> list[dict]:
    bs = f"{block >> 20}M"
    ours, theirs = workdir / f"ours-{bs}.vhdx", workdir / f"qemu-{bs}.vhdx"

    def rm(p: Path):
        return lambda: p.unlink(missing_ok=True)

    rows = []

    def row(name: str, a: dict, b: dict, peer: str) -> None:
        rows.append({"work": f"{name} ({bs} blocks)", "ours_s": a["seconds"], "ours_rss": a["rss"], "peer": peer,
                     "peer_s": b["seconds"], "peer_rss": b["rss"], "time_ratio": a["seconds"] / b["seconds"],
                     "rss_ratio": a["rss"] / b["rss"]})

    qemu_create = ["qemu-img", "create", "-q", "-f", "vhdx", "-o", f"subformat=dynamic,block_size={bs}", str(theirs),
                   "64T"]
    ours_create = [PY, "-m", "vhdx", "create", str(ours), "64T", "--block-size", bs]
    if only_open:
        measure(qemu_create, 1, rm(theirs))
        measure(ours_create, 1, rm(ours))
    else:
        b = measure(qemu_create, rounds, rm(theirs))
        row("create (CLI)", measure(ours_create, rounds, rm(ours)), b, "qemu-img create")
        row("create (library)", measure([PY, "-c", LIB_OURS, "create", str(ours), str(block)], rounds, rm(ours)), b,
            "qemu-img create")
    for tag, disk in (("", ours), ("q-", theirs)):
        for verb in () if only_open else ("info", "check"):
            b = measure(["qemu-img", verb, str(disk)], rounds)
            row(f"{tag}{verb} (CLI)", measure([PY, "-m", "vhdx", verb, str(disk)], rounds), b, f"qemu-img {verb}")
            row(f"{tag}{verb} (library)", measure([PY, "-c", LIB_OURS, verb, str(disk)], rounds), b, f"qemu-img {verb}")
        a, b = measure_side_by_side([[PY, "-c", OPEN_OURS, str(disk)], [PY, "-c", OPEN_PYVHDI, str(disk)]], open_rounds)
        row(f"{tag}open+tail (first)", a, b, "pyvhdi")
        row(f"{tag}open+tail (warm)", dict(a, seconds=a["warm"]), dict(b, seconds=b["warm"]), "pyvhdi")
    for p in (ours, theirs):
        st = p.stat()
        rows.append({"work": f"file {p.name}", "apparent": st.st_size, "on_disk": st.st_blocks * 512})
    return rows


MAINTENANCE = [  # (row, vhdx arguments; {disk} and {out} filled in), run in this order on one disk
    ("compact --dry-run", ["compact", "--dry-run", "{disk}"]),
    ("resize to 32 TiB", ["resize", "--allow-data-loss", "{disk}", "32T"]),
    ("resize back to 64 TiB", ["resize", "{disk}", "64T"]),
    ("compact", ["compact", "{disk}"]),
    ("convert", ["convert", "--overwrite", "{disk}", "{out}"]),
    ("repair to a copy", ["repair", "{disk}", "-o", "{out}"]),
    ("check", ["check", "{disk}"]),
]


def maintenance_rows(workdir: Path, rounds: int) -> list[dict]:
    """compact, resize, convert and repair of a 64 TiB disk (1 MiB blocks, eight 4 KiB pieces of
    data and one block of zeros), as CLI commands: time and peak RSS. No peer: qemu-img cannot
    compact or resize a VHDX ("Image format driver does not support resize")."""
    disk, out = workdir / "maint-1M.vhdx", workdir / "maint-out.vhdx"
    disk.unlink(missing_ok=True)
    build = ("import sys, vhdx\nwith vhdx.create(sys.argv[1], 64 << 40, block_size=1 << 20) as d:\n"
             "    for i in range(8): d.pwrite(bytes([65 + i]) * 4096, i * (8 << 40) + (5 << 20))\n"
             "    d.pwrite(bytes(4096), 3 << 40)\n")
    subprocess.run([PY, "-c", build, str(disk)], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in MAINTENANCE}
    for _ in range(rounds):  # the whole sequence each round: every resize changes the size again
        for name, args in MAINTENANCE:
            cmd = [PY, "-m", "vhdx", *[a.format(disk=disk, out=out) for a in args]]
            runs[name].append(measure(cmd, 1, lambda: out.unlink(missing_ok=True)))
    rows = [{"work": f"{name} (64T CLI)", "seconds": statistics.median(r["seconds"] for r in found),
             "rss": statistics.median(r["rss"] for r in found)} for name, found in runs.items()]
    out.unlink(missing_ok=True)
    disk.unlink(missing_ok=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--open-rounds", type=int, default=11,
                    help="children per open+tail and chain row, ours and pyvhdi taking turns (default 11)")
    ap.add_argument("--only-open", action="store_true", help="only the open+tail and 64-deep chain rows")
    ap.add_argument("--only-maintenance", action="store_true", help="only the compact/resize/convert/repair rows")
    ap.add_argument("--workdir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("qemu-img",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        if not args.only_maintenance:
            for block in (1 << 20, 32 << 20):
                rows += rows_for(workdir, block, args.rounds, args.open_rounds, args.only_open)
            rows += chain_rows(workdir, args.open_rounds)
        if not args.only_open:
            rows += maintenance_rows(workdir, args.rounds)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    mib = 1 << 20
    print(f"{'work':32} {'ours':>9} {'RSS':>8}   {'peer':16} {'peer':>9} {'RSS':>8}   {'time x':>7} {'RSS x':>6}")
    for r in rows:
        if "apparent" in r:
            print(f"{r['work']:32} {r['apparent'] / mib:.1f} MiB long, {r['on_disk'] / mib:.1f} MiB on disk")
            continue
        if "peer" not in r:
            print(f"{r['work']:32} {_seconds(r['seconds'])} {r['rss'] / mib:6.1f}Mi   (no peer)")
            continue
        print(f"{r['work']:32} {_seconds(r['ours_s'])} {r['ours_rss'] / mib:6.1f}Mi   {r['peer']:16} "
              f"{_seconds(r['peer_s'])} {r['peer_rss'] / mib:6.1f}Mi   {r['time_ratio']:7.2f} {r['rss_ratio']:6.2f}")


def _seconds(value: float) -> str:
    """Nine characters: milliseconds below 0.1 s (the open rows are fractions of one), else seconds."""
    return f"{value * 1e3:7.3f}ms" if value < 0.1 else f"{value:8.4f}s"


if __name__ == "__main__":
    main()
