#!/usr/bin/env python3
"""Merge throughput of vhdx against ``cp`` and ``qemu-img commit``.

    python benchmarks/bench_merge.py [--size 2G] [--rounds 3] [--workdir DIR] [--json] [--keep]
    python benchmarks/bench_merge.py --suite [--rows 8g-cold,2g-delete,16-layer,1t-sparse,xfs-reflink] [--rounds N] [--count-syncs]

``--suite`` runs the rows of issue 10 once each (see :func:`suite_main` below); without it:

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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fsync_path, parse_size, run  # noqa: E402

MiB = 1 << 20
CHILD_BLOCK = 2 * MiB
RUN = 64 * 1024
PATTERN_FILES = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def settle(cold: bool) -> None:
    """Before a timed step: the inputs just copied written out (``sync``), so that no method pays
    for the write-back of its inputs' fresh copies (ours are 2.7 GiB in the 16-layer row, cp's
    1 GiB: measured, that write-back doubled our 16-layer time); and for a cold row, the page cache
    dropped too."""
    if not (cold and try_drop_caches()):
        subprocess.run(["sync"], check=True)


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
    if "--suite" in sys.argv:  # the rows of issue 10, one run each
        return suite_main([a for a in sys.argv[1:] if a != "--suite"])
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
            write_raw(raw, nbytes, patterns)
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


# ------------------------------------------------------------------ the suite (issue 10's rows)

SUITE_DOC = """Rows, each run once (the machine is shared: one run, spreads are wide):

* ``8g-cold``: a 16 GiB child (layout above: 8.2 GiB copied) into a dynamic parent, ``keep``
  (no delete), cold cache; against ``cp`` + fsync of a raw file of the same bytes and
  ``qemu-img commit`` (+ fsync) of the same writes in qcow2.
* ``2g-delete``: the same with a 4 GiB child (2.1 GiB copied), merged files deleted; reports the
  time merge() takes (the deletes durable) and the time until the deleted child's space is free
  (``wait_for_release``), and, separately, the unlink of the 2 GiB copy ``cp`` made.
* ``16-layer``: 16 checkpoints over a base, 1 GiB disk, 2 MiB blocks, each layer writes an eighth
  of the blocks, shifted per layer (every block is written by two layers: each byte is read once,
  from the newer); warm cache; against ``cp`` of the 1 GiB result and
  ``qemu-img commit -b base.qcow2 top.qcow2``.
* ``1t-sparse``: a 1 TiB child with 512 changed 2 MiB blocks (1 GiB), one every 2 GiB, cold
  cache; also the planning time (a dry run) on its own.
* ``xfs-reflink``: 8 GiB of whole 2 MiB blocks merged on a loop-mounted XFS (``mkfs.xfs -m
  reflink=1``), so every block is cloned; against ``cp --reflink=always`` of the child file.

Before every timed step the inputs just built or copied are written out (``sync``, untimed;
for cold rows as part of dropping the page cache), so no method pays for the write-back of its
inputs' copies. Peak RSS is the merge process's VmHWM. Everything is built in one temporary folder (the
``--workdir``'s ``suite`` folder), one row at a time, and deleted after each row.

``--rounds N`` (N > 1; not for ``8g-cold`` and ``xfs-reflink``, which take one run): the row's
three inputs (VHDX chain, qcow2 chain, raw payload) are built once; every round copies them
afresh and times ours, cp and qemu-img commit in a rotating order (cold rows: each from a cold cache); the
table shows medians. Also reported per method: CPU time (user + system of the timed processes;
cp's and qemu's from wait4, ours from the merge process, whole process), and for ours the wall
time of the whole process (interpreter start-up, imports, merge, the wait for the deleted files'
release, exit: what ``vhdx merge`` pays) next to the library's time around ``merge()``.
``--count-syncs`` adds one untimed run of each under ``strace -f -c`` and reports their
fsync + fdatasync calls."""

SUITE_OURS = """
import json, sys, time
t0 = time.perf_counter()
from vhdx.ops.merge.run import merge, wait_for_release
child, into, keep, plan_first = sys.argv[1], sys.argv[2], sys.argv[3] == "keep", sys.argv[4] == "plan"
plan_s = None
if plan_first:
    t = time.perf_counter()
    merge(child, into, dry_run=True, keep=keep)
    plan_s = time.perf_counter() - t
t1 = time.perf_counter()
r = merge(child, into, keep=keep)
t2 = time.perf_counter()
wait_for_release()
t3 = time.perf_counter()
hwm = next((int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")), 0)
print(json.dumps(dict(merge_s=t2 - t1, released_s=t3 - t1, plan_s=plan_s, bytes_copied=r.bytes_copied,
                      bytes_cloned=r.bytes_cloned, deleted=len(r.deleted), vm_hwm=hwm)))
"""

GiB = 1 << 30


def build_layers_ours(folder: Path, size: int, parent_block: int, child_block: int,
                      layers: list[list[tuple[int, int, int]]], patterns: list[bytes]) -> list[Path]:
    """A dynamic base and one snapshot per further writes list; base first."""
    import vhdx
    paths = [folder / "base.vhdx"]
    with vhdx.create(str(paths[0]), size, block_size=parent_block) as disk:
        for off, n, i in layers[0]:
            disk.seek(off)
            disk.write(patterns[i][:n])
    for writes in layers[1:]:
        paths.append(Path(vhdx.snapshot(str(paths[-1]), block_size=child_block)))
        with vhdx.open(str(paths[-1]), "r+") as disk:
            for off, n, i in writes:
                disk.seek(off)
                disk.write(patterns[i][:n])
    return paths


def build_layers_qemu(folder: Path, size: int, layers: list[list[tuple[int, int, int]]],
                      pattern_paths: list[Path]) -> list[Path]:
    """base.qcow2 and l1.qcow2 ... (relative backing names), with the same writes."""
    paths = [folder / "base.qcow2"]
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(paths[0]), str(size)])
    for k in range(1, len(layers)):
        p = folder / f"l{k}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", paths[-1].name, "-F", "qcow2", p.name], cwd=folder)
        paths.append(p)
    for p, writes in zip(paths, layers):
        for i in range(0, len(writes), 400):
            cmds = []
            for off, n, pat in writes[i:i + 400]:
                cmds += ["-c", f"write -q -s {pattern_paths[pat]} {off} {n}"]
            run(["qemu-io", "-f", "qcow2", *cmds, str(p)])
    return paths


def write_raw(path: Path, nbytes: int, patterns: list[bytes]) -> None:
    with open(path, "wb") as f:
        left, i = nbytes, 0
        while left:
            n = min(left, CHILD_BLOCK)
            f.write(patterns[i % PATTERN_FILES][:n])
            left -= n
            i += 1


def rows_layers(row: str) -> tuple[int, int, list[list[tuple[int, int, int]]], bool]:
    """(virtual size, parent block size, writes of each layer base first, cold cache) of a row."""
    if row in ("8g-cold", "2g-delete"):
        size = 16 * GiB if row == "8g-cold" else 4 * GiB
        parent, child = layout(size)
        return size, 32 * MiB, [parent, child], True
    if row == "16-layer":
        size, blocks = GiB, GiB // CHILD_BLOCK
        base = [(k * CHILD_BLOCK, CHILD_BLOCK, k % PATTERN_FILES) for k in range(0, blocks, 32)]
        layers = [base] + [[(k * CHILD_BLOCK, CHILD_BLOCK, (k + i) % PATTERN_FILES)
                            for k in range(blocks) if (k + i) % 8 == 0] for i in range(1, 17)]
        return size, 32 * MiB, layers, False
    if row == "1t-sparse":
        size = 1 << 40
        base = [(k * 64 * GiB, CHILD_BLOCK, k % PATTERN_FILES) for k in range(16)]
        child = [(k * 2 * GiB + CHILD_BLOCK, CHILD_BLOCK, k % PATTERN_FILES) for k in range(512)]
        return size, 32 * MiB, [base, child], True
    raise SystemExit(f"unknown row {row}")


def same_as_writes(path: Path, layers: list[list[tuple[int, int, int]]], patterns: list[bytes]) -> bool:
    """Whether the merged disk holds every layer's writes, the newest layer winning where they overlap."""
    import vhdx
    expect: dict[int, tuple[int, int]] = {}
    for writes in layers:
        for off, n, i in writes:
            expect[off] = (n, i)
    with vhdx.open(str(path)) as disk:
        for off, (n, i) in sorted(expect.items()):
            disk.seek(off)
            if disk.read(n) != patterns[i][:n]:
                log(f"MISMATCH at {off}")
                return False
    return True


def timed_ours(paths: list[Path], keep: bool, plan_first: bool, env: dict) -> dict:
    wall, rss, out = run_measured([sys.executable, "-c", SUITE_OURS, str(paths[-1]), str(paths[0]),
                                   "keep" if keep else "delete", "plan" if plan_first else "-"], env=env)
    d = json.loads(out)
    d["vm_hwm"] = d["vm_hwm"] or rss
    d["process_wall"] = wall
    return d


def timed_cp(src: Path, dst: Path, reflink: str = "never") -> float:
    t = time.perf_counter()
    run(["cp", f"--reflink={reflink}", str(src), str(dst)])
    fsync_path(dst)
    return time.perf_counter() - t


def free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / GiB


def suite_row(row: str, work: Path, patterns: list[bytes], pattern_paths: list[Path], env: dict,
              have_qemu: bool) -> dict:
    """Build, time and clean up one row (files of one method at a time, to bound disk use)."""
    size, parent_block, layers, cold = rows_layers(row)
    res: dict = dict(row=row, cache="cold" if cold else "warm")
    folder = work / row
    folder.mkdir()
    try:
        log(f"[{row}] building the VHDX chain ({len(layers) - 1} layers over a base) ...")
        paths = build_layers_ours(folder, size, parent_block, CHILD_BLOCK, layers, patterns)
        from vhdx.ops.merge.run import merge
        plan = merge(str(paths[-1]), str(paths[0]), dry_run=True)
        nbytes = res["bytes"] = plan.bytes_to_copy
        settle(cold)
        ours = timed_ours(paths, keep=(row != "2g-delete"), plan_first=(row == "1t-sparse"), env=env)
        assert ours["bytes_copied"] == nbytes, ours
        res["model_ok"] = same_as_writes(paths[0], layers, patterns)
        res.update(ours=ours["merge_s"], ours_released=ours["released_s"], plan_s=ours["plan_s"],
                   rss_mib=ours["vm_hwm"] / MiB, cloned=ours["bytes_cloned"])
        log(f"[{row}] ours {ours['merge_s']:.3f} s (space of deleted files free after {ours['released_s']:.3f} s)")
        merged = paths[0]
        for p in paths[1:]:
            if p.exists():
                p.unlink()
        compare = size <= 8 * GiB  # qemu-img compare reads every byte of a VHDX: too slow for big disks
        if not compare:
            merged.unlink()  # checked against the writes above; frees the space for the next method
        if have_qemu:
            log(f"[{row}] building the qcow2 chain ...")
            q = build_layers_qemu(folder, size, layers, pattern_paths)
            settle(cold)
            t = time.perf_counter()
            wall, qrss, _ = run_measured(["qemu-img", "commit", "-q", "-b", str(q[0]), str(q[-1])])
            fsync_path(q[0])
            res["qemu"], res["qemu_rss_mib"] = time.perf_counter() - t, qrss / MiB
            log(f"[{row}] qemu-img commit {res['qemu']:.3f} s")
            for p in q[1:]:
                p.unlink()
            if compare:
                c = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "qcow2", str(merged), str(q[0])],
                                   capture_output=True, text=True)
                res["same_as_qemu"] = c.returncode == 0
            q[0].unlink()
        if merged.exists():
            merged.unlink()
        raw, copy = folder / "payload.raw", folder / "copy.raw"
        write_raw(raw, nbytes, patterns)
        settle(cold)
        res["cp"] = timed_cp(raw, copy)
        log(f"[{row}] cp + fsync {res['cp']:.3f} s")
        if row == "2g-delete":
            t = time.perf_counter()
            copy.unlink()
            dfd = os.open(folder, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
            res["unlink_2g_s"] = time.perf_counter() - t
        return res
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def suite_reflink(work: Path, patterns: list[bytes], env: dict) -> dict:
    """8 GiB of whole blocks merged on a loop-mounted XFS with reflink: every block is cloned."""
    res: dict = dict(row="xfs-reflink", cache="warm")
    img, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(20 * GiB)
    run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(img)])
    dev = run(["losetup", "--find", "--show", str(img)]).stdout.strip()
    try:
        run(["mount", dev, str(mnt)])
        try:
            size = 8 * GiB
            child = [(k * CHILD_BLOCK, CHILD_BLOCK, k % PATTERN_FILES) for k in range(size // CHILD_BLOCK)]
            log("[xfs-reflink] building an 8 GiB child on XFS ...")
            paths = build_layers_ours(mnt, size, 32 * MiB, CHILD_BLOCK, [[], child], patterns)
            os.sync()
            res["cp"] = timed_cp(paths[-1], mnt / "copy.avhdx", reflink="always")
            (mnt / "copy.avhdx").unlink()
            ours = timed_ours(paths, keep=True, plan_first=False, env=env)
            res.update(bytes=ours["bytes_copied"], ours=ours["merge_s"], ours_released=ours["released_s"],
                       rss_mib=ours["vm_hwm"] / MiB, cloned=ours["bytes_cloned"])
            log(f"[xfs-reflink] ours {ours['merge_s']:.3f} s, cloned {ours['bytes_cloned'] / GiB:.2f} GiB")
        finally:
            unmount(mnt)
    finally:
        subprocess.run(["losetup", "-d", dev])
        img.unlink()
    return res


def unmount(mnt: Path) -> None:
    """Unmount ``mnt``, waiting up to 10 s while it is busy (the kernel may still hold the files
    just closed), then lazily: never leave a mount behind."""
    for _ in range(100):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)])


def children_cpu() -> float:
    """User + system seconds of every waited-for child process so far."""
    t = os.times()
    return t.children_user + t.children_system


def count_syncs(cmd: list[str], env: dict | None = None) -> int:
    """fsync + fdatasync calls of ``cmd`` and its threads/children (``strace -f -c``), -1 without strace."""
    if not shutil.which("strace"):
        return -1
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["strace", "-f", "-c", "-o", out.name, "-e", "trace=fsync,fdatasync", *cmd],
                       check=True, capture_output=True, env=env)
        return sum(int(line.split()[3]) for line in out.read().splitlines()
                   if line.split() and line.split()[-1] in ("fsync", "fdatasync"))


def build_row_inputs(row: str, folder: Path, patterns: list[bytes], pattern_paths: list[Path],
                     have_qemu: bool) -> tuple[list[Path], list[Path], Path, int]:
    """The row's VHDX chain, qcow2 chain (or []) and raw payload, built once into ``folder``."""
    size, parent_block, layers, _cold = rows_layers(row)
    paths = build_layers_ours(folder, size, parent_block, CHILD_BLOCK, layers, patterns)
    q = build_layers_qemu(folder, size, layers, pattern_paths) if have_qemu else []
    from vhdx.ops.merge.run import merge
    nbytes = merge(str(paths[-1]), str(paths[0]), dry_run=True).bytes_to_copy
    write_raw(folder / "payload.raw", nbytes, patterns)
    return paths, q, folder / "payload.raw", nbytes


def one_round(row: str, what: str, r: Path, names: dict, env: dict) -> dict:
    """Time one method on the fresh copies in ``r``: seconds, CPU seconds, and what else it reports."""
    cold, keep = rows_layers(row)[3], row != "2g-delete"
    settle(cold)
    cpu0 = children_cpu()
    if what == "ours":
        d = timed_ours([r / names["ours"][0], r / names["ours"][-1]], keep=keep, plan_first=(row == "1t-sparse"),
                       env=env)
        d["wall"] = d.pop("process_wall")
        d["s"] = d["merge_s"]
    elif what == "cp":
        d = {"s": timed_cp(r / "payload.raw", r / "copy.raw")}
    else:
        t = time.perf_counter()
        run(["qemu-img", "commit", "-q", "-b", str(r / names["qemu"][0]), str(r / names["qemu"][-1])])
        fsync_path(r / names["qemu"][0])
        d = {"s": time.perf_counter() - t}
    d["cpu"] = children_cpu() - cpu0
    return d


def suite_rounds(row: str, work: Path, patterns: list[bytes], pattern_paths: list[Path], env: dict,
                 have_qemu: bool, rounds: int, syncs: bool) -> dict:
    """``rounds`` interleaved rounds of one row (see SUITE_DOC); medians."""
    folder, r = work / row, work / f"{row}-round"
    folder.mkdir()
    try:
        log(f"[{row}] building the inputs once ...")
        paths, q, raw, nbytes = build_row_inputs(row, folder, patterns, pattern_paths, have_qemu)
        names = dict(ours=[p.name for p in paths], qemu=[p.name for p in q])
        methods = ["ours", "cp"] + (["qemu"] if have_qemu else [])
        got: dict[str, list[dict]] = {m: [] for m in methods}
        for k in range(rounds):
            for m in methods[k % len(methods):] + methods[:k % len(methods)]:
                shutil.rmtree(r, ignore_errors=True)
                r.mkdir()
                for p in (paths if m == "ours" else q if m == "qemu" else [raw]):
                    copy_fresh(p, r / p.name)
                got[m].append(one_round(row, m, r, names, env))
                log(f"[{row}] round {k + 1}: {m:5} {got[m][-1]['s']:.3f} s, CPU {got[m][-1]['cpu']:.2f} s")
        med = {m: statistics.median(x["s"] for x in v) for m, v in got.items()}
        res = dict(row=row, cache="cold" if rows_layers(row)[3] else "warm", bytes=nbytes, rounds=rounds,
                   ours=med["ours"], cp=med["cp"], qemu=med.get("qemu"),
                   cpu={m: statistics.median(x["cpu"] for x in v) for m, v in got.items()},
                   ours_wall=statistics.median(x["wall"] for x in got["ours"]),
                   ours_released=statistics.median(x["released_s"] for x in got["ours"]),
                   plan_s=statistics.median(x["plan_s"] for x in got["ours"]) if row == "1t-sparse" else None,
                   rss_mib=max(x["vm_hwm"] for x in got["ours"]) / MiB,
                   cloned=max(x["bytes_cloned"] for x in got["ours"]),
                   all={m: [round(x["s"], 3) for x in v] for m, v in got.items()})
        if syncs:
            res["syncs"] = sync_counts(row, paths, q, r, env)
        return res
    finally:
        shutil.rmtree(r, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def sync_counts(row: str, paths: list[Path], q: list[Path], r: Path, env: dict) -> dict:
    """fsync + fdatasync calls of one untimed run of ours and of qemu-img commit (cp: the one fsync)."""
    out = {"cp": 1}
    shutil.rmtree(r, ignore_errors=True)
    r.mkdir()
    for p in paths + q:
        copy_fresh(p, r / p.name)
    out["ours"] = count_syncs([sys.executable, "-c", SUITE_OURS, str(r / paths[-1].name), str(r / paths[0].name),
                               "keep" if row != "2g-delete" else "delete", "-"], env)
    if q:
        out["qemu"] = count_syncs(["qemu-img", "commit", "-q", "-b", str(r / q[0].name), str(r / q[-1].name)]) + 1
    return out


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def suite_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="merge benchmark rows of issue 10 (one run each)",
                                 epilog=SUITE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8g-cold,2g-delete,16-layer,1t-sparse,xfs-reflink")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/var/tmp"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per row, medians (see below)")
    ap.add_argument("--count-syncs", action="store_true", help="count fsync/fdatasync calls (strace), untimed")
    args = ap.parse_args(argv)
    have_qemu = not args.no_qemu and bool(shutil.which("qemu-img") and shutil.which("qemu-io"))
    work = Path(tempfile.mkdtemp(prefix="bench_merge_suite-", dir=args.workdir))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    try:
        pattern_paths = make_patterns(work)
        patterns = [p.read_bytes() for p in pattern_paths]
        for row in args.rows.split(","):
            need = 24 if row == "8g-cold" else 14 if row == "xfs-reflink" else 8
            if free_gib(work) < need:
                log(f"[{row}] skipped: {free_gib(work):.1f} GiB free, {need} GiB needed")
                continue
            try:
                if args.rounds > 1 and row not in ("8g-cold", "xfs-reflink"):
                    results.append(suite_rounds(row, work, patterns, pattern_paths, env, have_qemu, args.rounds,
                                                args.count_syncs))
                else:
                    results.append(suite_reflink(work, patterns, env) if row == "xfs-reflink" else
                                   suite_row(row, work, patterns, pattern_paths, env, have_qemu))
            except Exception as e:  # noqa: BLE001 - a row that fails (a full shared disk) leaves the others
                log(f"[{row}] FAILED: {str(e)[-300:]}")
                continue
            log(json.dumps(results[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| row | copied | ours | cp + fsync | qemu-img commit | ours/cp | ours/qemu | peak RSS | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        qemu = r.get("qemu")
        notes = [f"{r['cache']} cache"]
        if r.get("plan_s") is not None:
            notes.append(f"plan (dry run) {r['plan_s']:.3f} s")
        if r.get("rounds"):
            cpu = r["cpu"]
            notes.append(f"median of {r['rounds']} interleaved rounds; CPU s ours/cp/qemu "
                         f"{cpu['ours']:.2f}/{cpu['cp']:.2f}/{cpu.get('qemu', 0):.2f}; ours as a whole process "
                         f"{r['ours_wall']:.2f} s (ratio to cp {r['ours_wall'] / r['cp']:.2f})")
        if r.get("syncs"):
            notes.append("fsync+fdatasync calls ours/cp/qemu " + "/".join(str(r["syncs"].get(k, "-"))
                                                                          for k in ("ours", "cp", "qemu")))
        if r["row"] == "2g-delete" and "unlink_2g_s" in r:
            notes.append(f"space of the deleted child free after {r['ours_released']:.2f} s; "
                         f"unlink of cp's 2 GiB copy {r['unlink_2g_s']:.2f} s")
        elif r["row"] == "2g-delete":
            notes.append(f"space of the deleted child free after {r['ours_released']:.2f} s")
        if r.get("cloned"):
            notes.append(f"cloned {r['cloned'] / GiB:.2f} GiB")
        if r["row"] == "xfs-reflink":
            notes.append("peer: cp --reflink=always of the child file")
        if not r.get("model_ok", True):
            notes.append("CONTENT WRONG")
        if r.get("same_as_qemu") is not None:
            notes.append("same disk as qemu-img commit" if r["same_as_qemu"] else "DIFFERS from qemu-img commit")
        print(f"| {r['row']} | {r['bytes'] / GiB:.2f} GiB | {r['ours']:.2f} s | {r['cp']:.2f} s | "
              f"{f'{qemu:.2f} s' if qemu else '-'} | {r['ours'] / r['cp']:.2f} | "
              f"{ratio(r['ours'], qemu)} | "
              f"{r['rss_mib']:.0f} MiB | {'; '.join(notes)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
