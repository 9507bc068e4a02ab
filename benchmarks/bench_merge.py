#!/usr/bin/env python3
"""Merge throughput of vhdx against ``cp`` and ``qemu-img commit``.

    python benchmarks/bench_merge.py [--size 2G] [--rounds 3] [--workdir DIR] [--json] [--keep]

Builds once (not timed):

* ``parent.vhdx``: dynamic, ``--parent-block`` (default 32 MiB) blocks, the first 2 MiB of every
  64 MiB written (so with 32 MiB blocks half of the parent's blocks must be allocated by the merge);
* ``child.avhdx``: a differencing child of ``--size`` with 2 MiB blocks: half of its blocks
  (the even ones) FULLY written, and a tenth (every fifth odd block) PARTIALLY_PRESENT with four
  64 KiB runs each, written into otherwise untouched blocks;
* ``base.qcow2`` + ``overlay.qcow2`` (``qemu-img create -f qcow2 -b base.qcow2 -F qcow2``) with
  exactly the same writes and bytes, done with ``qemu-io -c "write -s FILE OFF LEN"``;
* ``payload.raw``: a raw file of as many bytes as our merge copies.

Each round starts from fresh copies (``cp --reflink=never``) of those pristine files and, when
``/proc/sys/vm/drop_caches`` can be written, from a cold page cache (``sync; echo 3 >
/proc/sys/vm/drop_caches`` before every timed operation); otherwise the cache is warm and the
report says so. Timed, in a rotating order per round:

* ``ours``: ``vhdx.ops.merge.run.merge(child, parent)`` in a child process; the time is measured
  inside that process around the call (no interpreter start-up) and includes its fdatasyncs;
  the process's peak RSS is its VmHWM (``/proc/self/status``) read at the end;
* ``cp``: ``cp --reflink=never payload.raw copy.raw`` plus an fsync of the copy (our merge and
  ``qemu-img commit`` both make the destination durable);
* ``qemu-img commit``: ``qemu-img commit overlay.qcow2`` plus an fsync of ``base.qcow2``.

After the first round, ``qemu-img compare`` checks that the merged parent and the committed qcow2
base hold the same virtual disk. Prints medians, MiB/s (bytes our merge copied, per second), the
ratios ours/cp and ours/qemu-img commit (above 1: ours is slower) and the peak memory of our merge.
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
sys.path.insert(0, str(REPO))

MiB = 1 << 20
CHILD_BLOCK = 2 * MiB
RUN = 64 * 1024
PATTERN_FILES = 8


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------ the same writes for both formats

def layout(size: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(offset, length, pattern index) writes of the parent and of the child."""
    parent = []
    for k in range(0, -(-size // CHILD_BLOCK), 32):   # every 64 MiB: half of 32 MiB parent blocks
        off = k * CHILD_BLOCK
        parent.append((off, min(CHILD_BLOCK, size - off), k % PATTERN_FILES))
    child = []
    for k in range(-(-size // CHILD_BLOCK)):
        off = k * CHILD_BLOCK
        if k % 2 == 0:                       # half the blocks: FULLY_PRESENT
            child.append((off, min(CHILD_BLOCK, size - off), (k // 2) % PATTERN_FILES))
        elif k % 10 == 1:                    # a tenth: PARTIALLY_PRESENT, four 64 KiB runs
            for j in range(4):
                o = off + j * (CHILD_BLOCK // 4) + 8 * 512
                if o + RUN <= size:
                    child.append((o, RUN, (k + j) % PATTERN_FILES))
    return parent, child


def make_patterns(folder: Path) -> list[Path]:
    paths = []
    for i in range(PATTERN_FILES):
        p = folder / f"pattern-{i}.bin"
        if not p.exists():
            p.write_bytes(os.urandom(CHILD_BLOCK))
        paths.append(p)
    return paths


def build_ours(folder: Path, size: int, parent_block: int, patterns: list[bytes]) -> tuple[Path, Path]:
    import vhdx
    parent, child = folder / "parent.vhdx", folder / "child.avhdx"
    pw, cw = layout(size)
    with vhdx.create(str(parent), size, block_size=parent_block) as disk:
        for off, n, i in pw:
            disk.seek(off)
            disk.write(patterns[i][:n])
    with vhdx.create(str(child), parent=str(parent), block_size=CHILD_BLOCK) as disk:
        for off, n, i in cw:
            disk.seek(off)
            disk.write(patterns[i][:n])
    return parent, child


def build_qemu(folder: Path, size: int, pattern_paths: list[Path]) -> tuple[Path, Path]:
    base, overlay = folder / "base.qcow2", folder / "overlay.qcow2"
    pw, cw = layout(size)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)])

    def write_all(image: Path, writes) -> None:
        for i in range(0, len(writes), 400):   # keep the command line short
            cmds = []
            for off, n, p in writes[i:i + 400]:
                cmds += ["-c", f"write -q -s {pattern_paths[p]} {off} {n}"]
            run(["qemu-io", "-f", "qcow2", *cmds, str(image)])

    write_all(base, pw)
    # A relative backing path, so that the copy of each round commits into the copy of the base.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay.name], cwd=folder)
    info = json.loads(run(["qemu-img", "info", "--output=json", str(overlay)]).stdout)
    assert info.get("backing-filename") == base.name, info
    write_all(overlay, cw)
    return base, overlay


# ------------------------------------------------------------------ timing helpers

def try_drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process (VmHWM), 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], **kw) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of one child process.

    The peak is VmHWM polled every 5 ms while the process runs (its last value before exit is
    the peak, to within the polling interval). ``ru_maxrss`` from wait4 is not used: Linux starts
    it at the parent's RSS, which would report this script's memory instead of the child's.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    peak = 0
    import threading
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()))
               for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for t in readers:
        t.start()
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid))
        time.sleep(0.005)
    for t in readers:
        t.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {b''.join(err_chunks).decode(errors='replace')[-2000:]}")
    return wall, peak, b"".join(out_chunks).decode()


OURS = """
import json, sys, time
t0 = time.perf_counter()
from vhdx.ops.merge.run import merge
t1 = time.perf_counter()
r = merge(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
hwm = next((int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")), 0)
print(json.dumps(dict(import_s=t1 - t0, merge_s=t2 - t1, bytes_copied=r.bytes_copied,
                      blocks=r.plan.destination_blocks, allocations=r.plan.allocations, vm_hwm=hwm)))
"""


def copy_fresh(src: Path, dst: Path) -> None:
    run(["cp", "--reflink=never", "--sparse=always", str(src), str(dst)])


# ------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="virtual size of the child (default 2G)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", help="where to build (default: a new folder in $TMPDIR or /var/tmp)")
    ap.add_argument("--parent-block", default="32M", help="block size of the dynamic parent (default 32M)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--no-qemu", action="store_true", help="skip the qemu-img commit comparison")
    args = ap.parse_args()
    size = parse_size(args.size)
    parent_block = parse_size(args.parent_block)
    have_qemu = not args.no_qemu and shutil.which("qemu-img") and shutil.which("qemu-io")

    own_dir = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    pristine = work / f"pristine-{size >> 20}M"
    pristine.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        t0 = time.perf_counter()
        pattern_paths = make_patterns(work)
        patterns = [p.read_bytes() for p in pattern_paths]
        if not (pristine / "child.avhdx").exists():
            for p in pristine.iterdir():
                p.unlink()
            log(f"building the VHDX chain ({size >> 20} MiB) ...")
            build_ours(pristine, size, parent_block, patterns)
        if have_qemu and not (pristine / "overlay.qcow2").exists():
            log("building the qcow2 chain ...")
            build_qemu(pristine, size, pattern_paths)
        from vhdx.ops.merge.run import merge
        plan = merge(str(pristine / "child.avhdx"), str(pristine / "parent.vhdx"), dry_run=True)
        nbytes = plan.bytes_to_copy
        raw = pristine / "payload.raw"
        if not raw.exists() or raw.stat().st_size != nbytes:
            with open(raw, "wb") as f:
                left, i = nbytes, 0
                while left:
                    n = min(left, CHILD_BLOCK)
                    f.write(patterns[i % PATTERN_FILES][:n])
                    left -= n
                    i += 1
        log(f"built in {time.perf_counter() - t0:.1f} s; the merge copies {nbytes / MiB:.1f} MiB into "
            f"{plan.destination_blocks} destination blocks ({plan.allocations} to allocate)")

        cold = try_drop_caches()
        cache = "cold cache (drop_caches before each timed step)" if cold else "warm cache"
        results: dict[str, list[float]] = {"ours": [], "cp": []}
        if have_qemu:
            results["qemu-img commit"] = []
        peak_rss: list[int] = []
        qemu_rss: list[int] = []
        import_s: list[float] = []
        verified = None
        order = list(results)
        for r in range(args.rounds):
            rnd = work / f"round-{r}"
            if rnd.exists():
                shutil.rmtree(rnd)
            rnd.mkdir()
            for name in ("parent.vhdx", "child.avhdx") + (("base.qcow2", "overlay.qcow2") if have_qemu else ()):
                copy_fresh(pristine / name, rnd / name)
            for what in order[r % len(order):] + order[:r % len(order)]:
                if cold:
                    try_drop_caches()
                if what == "ours":
                    wall, rss, out = run_measured([sys.executable, "-c", OURS, str(rnd / "child.avhdx"),
                                                   str(rnd / "parent.vhdx")], env=env)
                    d = json.loads(out)
                    assert d["bytes_copied"] == nbytes, d
                    results["ours"].append(d["merge_s"])
                    peak_rss.append(d["vm_hwm"] or rss)
                    import_s.append(d["import_s"])
                elif what == "cp":
                    t = time.perf_counter()
                    run(["cp", "--reflink=never", str(raw), str(rnd / "copy.raw")])
                    fsync_path(rnd / "copy.raw")
                    results["cp"].append(time.perf_counter() - t)
                else:
                    t = time.perf_counter()
                    wall, rss, _ = run_measured(["qemu-img", "commit", "-q", str(rnd / "overlay.qcow2")])
                    fsync_path(rnd / "base.qcow2")
                    results["qemu-img commit"].append(time.perf_counter() - t)
                    qemu_rss.append(rss)
                log(f"round {r + 1}: {what:16} {results[what][-1]:.3f} s")
            if r == 0 and have_qemu:
                c = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "qcow2",
                                    str(rnd / "parent.vhdx"), str(rnd / "base.qcow2")], capture_output=True, text=True)
                verified = c.returncode == 0
                if not verified:
                    log(f"WARNING: the merged VHDX and the committed qcow2 differ (exit {c.returncode}): "
                        f"{c.stdout}{c.stderr}")
            shutil.rmtree(rnd)

        med = {k: statistics.median(v) for k, v in results.items()}
        report = dict(
            size=size, parent_block=parent_block, child_block=CHILD_BLOCK, rounds=args.rounds, cache=cache,
            bytes_copied=nbytes, destination_blocks=plan.destination_blocks, allocations=plan.allocations,
            median_s=med, min_s={k: min(v) for k, v in results.items()},
            mib_per_s={k: nbytes / MiB / v for k, v in med.items()},
            ratio_ours_cp=med["ours"] / med["cp"],
            ratio_ours_qemu_commit=(med["ours"] / med["qemu-img commit"]) if have_qemu else None,
            ours_peak_rss_mib=max(peak_rss) / MiB, ours_import_s=statistics.median(import_s),
            qemu_commit_peak_rss_mib=(max(qemu_rss) / MiB) if qemu_rss else None,
            same_content_as_qemu=verified, workdir=str(work),
            versions=dict(python=sys.version.split()[0],
                          qemu=run(["qemu-img", "--version"]).stdout.splitlines()[0] if have_qemu else None),
        )
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"merge benchmark: child {size / MiB:.0f} MiB (2 MiB blocks: 1/2 full, 1/10 partial in 64 KiB "
                  f"runs) into a dynamic parent ({parent_block // MiB} MiB blocks); {nbytes / MiB:.1f} MiB copied; "
                  f"{args.rounds} rounds; {cache}")
            print(f"  {'method':18} {'median s':>9} {'min s':>8} {'MiB/s':>8}")
            for k in results:
                print(f"  {k:18} {med[k]:9.3f} {min(results[k]):8.3f} {nbytes / MiB / med[k]:8.1f}")
            print(f"  ratio ours/cp              {report['ratio_ours_cp']:.2f}")
            if have_qemu:
                print(f"  ratio ours/qemu-img commit {report['ratio_ours_qemu_commit']:.2f}")
                print(f"  same virtual disk as qemu-img commit: {verified}")
            print(f"  peak RSS of our merge process: {report['ours_peak_rss_mib']:.1f} MiB "
                  f"(import of vhdx took {report['ours_import_s']:.2f} s, not timed)"
                  + (f"; qemu-img commit: {report['qemu_commit_peak_rss_mib']:.1f} MiB" if qemu_rss else ""))
        return 0
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
