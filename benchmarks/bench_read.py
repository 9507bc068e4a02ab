#!/usr/bin/env python3
"""Read throughput of vhdx against libvhdi, dissect.hypervisor, cat and qemu-img.

Builds a dynamic VHDX with qemu-img (32 MiB blocks), writes random data into every other
block with qemu-io, checks that every reader returns the same bytes, then times, in
alternating rounds:

  (a) reading the whole virtual disk into one reused 4 MiB buffer:
      vhdx (``vhdx.open`` + ``readinto``), libvhdi (``pyvhdi.file.read_buffer_at_offset``,
      which returns a new bytes object per call: it has no read-into), dissect.hypervisor
      (``VHDX.readinto``) and ``cat FILE > /dev/null`` (the host file, not the virtual disk:
      an upper bound for reading the allocated data);
  (b) exporting to a raw file: ``python -m vhdx export`` against ``qemu-img convert -O raw``
      (both as subprocesses, so Python start-up is included for ours; the ``startup-ours``
      row times ``python -c "import vhdx.cli"`` alone, to show that fixed cost).

Then (issue 10) side by side with pyvhdi and qemu-img, once each unless ``--rounds`` says more:

  (c) ``ours-mmap``: the same whole-disk read into a page-aligned (memory-mapped) buffer,
      next to ``ours`` into a plain ``bytearray`` (16 bytes past a page boundary), and
      ``ours-bytes``: ``disk.read(4 MiB)`` until the end, a new ``bytes`` per call as pyvhdi's;
  (d) random 4 KiB reads over the whole disk (ops/s, CPU time of the reading thread):
      ``seek`` + ``readinto`` and ``pread_into`` against ``read_buffer_at_offset``;
  (e) opening a 64-deep chain (built with vhdx, 4 KiB written in each layer) and reading
      4 KiB through it: ``vhdx.open(leaf)`` against 64 pyvhdi handles linked by ``set_parent``;
  (f) start-up: ``vhdx --help`` and ``python -c "import vhdx"`` against ``qemu-img --help``
      (and ``python -c pass``, the interpreter alone).

The page cache is warm (every file is read once before timing) and nothing is dropped:
the numbers compare CPU cost per byte, not disk speed. Prints the medians, MB/s (10^6
bytes per second of virtual disk; of the host file for cat) and time ratios; ``--json``
prints the same as JSON.

    python benchmarks/bench_read.py [--size 1G] [--rounds 3] [--workdir DIR] [--json] [--skip M]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import random
import resource
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
from common import parse_size, run  # noqa: E402

BUF_SIZE = 4 << 20
BLOCK_SIZE = 32 << 20
RANDOM_READS = 100_000
CHAIN_DEPTH = 64


# ------------------------------------------------------------------ the image

def build_image(workdir: Path, size: int) -> Path:
    """qemu-img create + qemu-io writes of random data into every other 32 MiB block."""
    image = workdir / f"bench-{size >> 20}M.vhdx"
    if image.exists():
        return image
    tmp = image.with_suffix(".part")
    tmp.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", f"block_size={BLOCK_SIZE >> 20}M,subformat=dynamic",
         str(tmp), str(size)])
    blocks = -(-size // BLOCK_SIZE)
    commands = []
    sources = []
    for k in range(0, blocks, 2):
        # a fresh random pattern file per 8 blocks keeps the data non-repeating but cheap to make
        if len(sources) <= k // 16:
            src = workdir / f"random-{len(sources)}.bin"
            src.write_bytes(os.urandom(BLOCK_SIZE))
            sources.append(src)
        length = min(BLOCK_SIZE, size - k * BLOCK_SIZE)
        commands += ["-c", f"write -q -s {sources[k // 16]} {k * BLOCK_SIZE} {length}"]
    run(["qemu-io", "-f", "vhdx", *commands, str(tmp)])
    for src in sources:
        src.unlink()
    tmp.rename(image)
    return image


# ------------------------------------------------------------------ readers

def read_all(disk, size: int, buf: bytearray, digest=None) -> int:
    """``readinto`` ``buf`` until ``size`` bytes (or a read of none); the bytes read."""
    view = memoryview(buf)
    total = 0
    while total < size:
        n = disk.readinto(view[:min(len(view), size - total)])
        if not n:
            break
        if digest is not None:
            digest.update(view[:n])
        total += n
    return total


def read_ours(path: Path, buf: bytearray, digest=None) -> int:
    import vhdx
    with vhdx.open(str(path)) as disk:
        return read_all(disk, disk.size, buf, digest)


def read_libvhdi(path: Path, buf: bytearray, digest=None) -> int:
    import pyvhdi
    f = pyvhdi.file()
    f.open(str(path))
    try:
        size = f.get_media_size()
        offset = 0
        while offset < size:
            data = f.read_buffer_at_offset(min(len(buf), size - offset), offset)
            if not data:
                raise RuntimeError(f"libvhdi returned nothing at {offset}")
            if digest is not None:
                digest.update(data)
            offset += len(data)
    finally:
        f.close()
    return offset


def read_dissect(path: Path, buf: bytearray, digest=None) -> int:
    from dissect.hypervisor.disk.vhdx import VHDX
    with open(path, "rb") as fh:
        disk = VHDX(fh)
        return read_all(disk, disk.size, buf, digest)


def read_cat(path: Path, buf: bytearray, digest=None) -> int:
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", str(path)], stdout=null, check=True)
    return path.stat().st_size


def export_ours(path: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "vhdx", "export", "--no-progress", str(path), str(out)],
                   check=True, cwd=str(REPO), capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))


def startup_ours(path: Path, out: Path) -> None:
    """Interpreter start plus ``import vhdx.cli``: the fixed cost inside export-ours."""
    subprocess.run([sys.executable, "-c", "import vhdx.cli"], check=True, cwd=str(REPO),
                   env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))


def export_qemu(path: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path), str(out)])


def read_ours_bytes(path: Path, buf: bytearray, digest=None) -> int:
    """``disk.read(len(buf))`` until the end: a new ``bytes`` per call, as pyvhdi returns."""
    import vhdx
    total = 0
    with vhdx.open(str(path)) as disk:
        while data := disk.read(len(buf)):
            if digest is not None:
                digest.update(data)
            total += len(data)
    return total


def read_ours_mmap(path: Path, buf: bytearray, digest=None) -> int:
    """``read_ours`` into a page-aligned buffer of the same size (an anonymous memory map)."""
    return read_ours(path, mmap.mmap(-1, len(buf)), digest)


# ------------------------------------------------------------------ random reads, deep chains, start-up

def random_offsets(size: int, count: int = RANDOM_READS) -> list[int]:
    """``count`` 4 KiB-aligned offsets all over the disk, the same every run."""
    rng = random.Random(10)
    return [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]


def random_ours(path: Path, offsets: list[int]) -> float:
    """CPU seconds of ``seek`` + ``readinto`` of 4 KiB at every offset (one open disk, a bytearray)."""
    import vhdx
    view = memoryview(bytearray(4096))
    with vhdx.open(str(path)) as disk:
        t = time.thread_time()
        for offset in offsets:
            disk.seek(offset)
            disk.readinto(view)
        return time.thread_time() - t


def random_ours_pread(path: Path, offsets: list[int]) -> float:
    """CPU seconds of ``pread_into`` of 4 KiB at every offset."""
    import vhdx
    view = memoryview(bytearray(4096))
    with vhdx.open(str(path)) as disk:
        t = time.thread_time()
        for offset in offsets:
            disk.pread_into(view, offset)
        return time.thread_time() - t


def random_libvhdi(path: Path, offsets: list[int]) -> float:
    """CPU seconds of ``read_buffer_at_offset(4096, offset)`` at every offset."""
    import pyvhdi
    f = pyvhdi.file()
    f.open(str(path))
    try:
        t = time.thread_time()
        for offset in offsets:
            f.read_buffer_at_offset(4096, offset)
        return time.thread_time() - t
    finally:
        f.close()


def build_chain(workdir: Path, depth: int = CHAIN_DEPTH) -> list[Path]:
    """A ``depth``-deep chain of 256 MiB disks (1 MiB blocks), 4 KiB written in each layer; base first."""
    import vhdx
    folder = workdir / f"chain{depth}"
    paths = [folder / "base.vhdx"] + [folder / f"layer{i:02}.avhdx" for i in range(1, depth)]
    if paths[-1].exists():
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, path in enumerate(paths):
        disk = vhdx.create(str(path), 256 << 20, block_size=1 << 20) if i == 0 else \
            vhdx.create(str(path), parent=str(paths[i - 1]), block_size=1 << 20)
        with disk:
            disk.pwrite(bytes([i + 1]) * 4096, i * (3 << 20))
    return paths


def chain_open_ours(paths: list[Path]) -> bytes:
    """Open the leaf (every parent found and checked), read 4 KiB from the base's data, close."""
    import vhdx
    with vhdx.open(str(paths[-1])) as disk:
        return disk.pread(0, 4096)


def chain_open_libvhdi(paths: list[Path]) -> bytes:
    """Open every layer in pyvhdi, link each to its parent, read 4 KiB, close."""
    import pyvhdi
    handles = []
    try:
        for path in paths:
            handle = pyvhdi.file()
            handle.open(str(path))
            if handles:
                handle.set_parent(handles[-1])
            handles.append(handle)
        return handles[-1].read_buffer_at_offset(4096, 0)
    finally:
        for handle in reversed(handles):
            handle.close()


def startup_command(name: str) -> list[str]:
    """The command line of a start-up method."""
    return {"vhdx --help": [sys.executable, "-m", "vhdx", "--help"],
            "import vhdx": [sys.executable, "-c", "import vhdx"],
            "python": [sys.executable, "-c", "pass"],
            "qemu-img --help": ["qemu-img", "--help"]}[name]


def time_startup(name: str) -> float:
    """Wall seconds of one run of a start-up command (output discarded)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    subprocess.run(startup_command(name), check=True, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def cpu_seconds() -> float:
    """CPU time (user + system) of this thread and of every finished child process: less
    disturbed than wall time on a shared machine."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.thread_time() + children.ru_utime + children.ru_stime


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BUF_SIZE):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ versions

def versions() -> dict:
    v = {"python": platform.python_version()}
    try:
        import vhdx
        v["vhdx"] = getattr(vhdx, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        v["vhdx"] = f"unavailable: {e}"
    try:
        import pyvhdi
        v["libvhdi"] = pyvhdi.get_version()
    except Exception as e:  # noqa: BLE001
        v["libvhdi"] = f"unavailable: {e}"
    try:
        from importlib.metadata import version
        v["dissect.hypervisor"] = version("dissect.hypervisor")
    except Exception as e:  # noqa: BLE001
        v["dissect.hypervisor"] = f"unavailable: {e}"
    try:
        v["qemu-img"] = run(["qemu-img", "--version"]).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001
        v["qemu-img"] = f"unavailable: {e}"
    return v


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"), help="virtual size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per method (default 3)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to build the image (kept, and reused if present); default: a temporary "
                         "folder that is removed afterwards")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--skip", action="append", default=[],
                    help="leave out a method: ours, ours-mmap, ours-bytes, libvhdi, dissect, cat, export-ours, export-qemu, "
                         "startup-ours; or a section: random, chain, startup")
    args = ap.parse_args(argv)

    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"bench_read: {tool} is not installed", file=sys.stderr)
            return 2
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="vhdx-bench-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return bench(args, workdir)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def bench(args, workdir: Path) -> int:
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    t0 = time.perf_counter()
    image = build_image(workdir, args.size)
    log(f"image: {image} ({args.size} bytes virtual, {image.stat().st_size} bytes on disk, "
        f"built/reused in {time.perf_counter() - t0:.1f} s)")
    size = args.size
    buf = bytearray(BUF_SIZE)

    readers = {"ours": read_ours, "ours-mmap": read_ours_mmap, "ours-bytes": read_ours_bytes, "libvhdi": read_libvhdi,
               "dissect": read_dissect, "cat": read_cat}
    readers = {k: v for k, v in readers.items() if k not in args.skip}

    # Correctness first (this also warms the page cache): every reader gives the same bytes.
    digests = {}
    for name, fn in readers.items():
        if name == "cat":
            fn(image, buf)
            continue
        h = hashlib.sha256()
        try:
            got = fn(image, buf, h)
        except Exception as e:  # noqa: BLE001 - a broken reader is reported, the rest still run
            log(f"{name}: failed: {type(e).__name__}: {e}")
            readers[name] = None
            continue
        digests[name] = h.hexdigest()
        if got != size:
            log(f"warning: {name} read {got} bytes, expected {size}")
    readers = {k: v for k, v in readers.items() if v is not None}
    if len(set(digests.values())) > 1:
        log("warning: readers disagree on the contents: " + json.dumps(digests, indent=1))

    exporters = {"export-ours": export_ours, "export-qemu": export_qemu, "startup-ours": startup_ours}
    exporters = {k: v for k, v in exporters.items() if k not in args.skip}
    out = workdir / "out.raw"
    export_digests = {}
    for name, fn in list(exporters.items()):
        try:
            fn(image, out)
        except subprocess.CalledProcessError as e:
            log(f"{name}: failed (exit {e.returncode}): {(e.stderr or '').strip()[:300]}")
            del exporters[name]
            continue
        if name != "startup-ours":
            export_digests[name] = sha256_file(out)
    if len(set(export_digests.values())) > 1:
        log("warning: exports differ: " + json.dumps(export_digests, indent=1))

    methods = {**{k: (lambda fn=fn: fn(image, buf)) for k, fn in readers.items()},
               **{k: (lambda fn=fn: fn(image, out)) for k, fn in exporters.items()}}
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]     # rotate: no method always first
        for name in order:
            c, t = cpu_seconds(), time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(cpu_seconds() - c)
    out.unlink(missing_ok=True)

    file_size = image.stat().st_size
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        nbytes = {"cat": file_size, "startup-ours": 0}.get(name, size)
        results[name] = {"median_s": med, "min_s": min(ts), "rounds_s": ts, "bytes": nbytes,
                         "MB_per_s": nbytes / med / 1e6 if nbytes else None,
                         "cpu_median_s": statistics.median(cpu[name]), "cpu_rounds_s": cpu[name]}

    def ratio(a: str, b: str, key: str = "median_s"):
        if a in results and b in results:
            return results[a][key] / results[b][key]
        return None

    ratios = {"ours/libvhdi": ratio("ours", "libvhdi"), "ours-mmap/libvhdi": ratio("ours-mmap", "libvhdi"),
              "ours-bytes/libvhdi": ratio("ours-bytes", "libvhdi"),
              "ours/dissect": ratio("ours", "dissect"),
              "ours/cat": ratio("ours", "cat"), "export ours/qemu-img": ratio("export-ours", "export-qemu"),
              "CPU ours/libvhdi (goal <= 1.0)": ratio("ours", "libvhdi", "cpu_median_s"),
              "CPU ours-mmap/libvhdi": ratio("ours-mmap", "libvhdi", "cpu_median_s"),
              "CPU export ours/qemu-img": ratio("export-ours", "export-qemu", "cpu_median_s")}
    report = {"virtual_size": size, "file_size": file_size, "buffer": BUF_SIZE, "rounds": args.rounds,
              "cache": "warm (nothing dropped)", "versions": versions(), "results": results,
              "ratios_of_median_time": ratios, "contents_sha256": digests, "export_sha256": export_digests,
              "issue10": issue10_sections(args, workdir, image, log)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    print(f"\n{args.rounds} rounds, alternating; warm page cache; 4 MiB reused buffer; "
          f"MB = 10^6 bytes of virtual disk (cat: of the {file_size}-byte host file)")
    print(f"{'method':<14}{'median s':>10}{'min s':>10}{'MB/s':>10}{'CPU s':>10}")
    for name, r in results.items():
        rate = "-" if r["MB_per_s"] is None else f"{r['MB_per_s']:.0f}"
        print(f"{name:<14}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{rate:>10}{r['cpu_median_s']:>10.3f}")
    print("\ntime ratios of medians (> 1: ours is slower; CPU: user + system time, children included)")
    for name, value in ratios.items():
        print(f"  {name:<34}{'n/a' if value is None else f'{value:.2f}'}")
    print_issue10(report["issue10"])
    print("\nversions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    return 0


def issue10_sections(args, workdir: Path, image: Path, log) -> dict:
    """Random 4 KiB reads, a 64-deep chain's open and start-up, each method timed ``args.rounds``
    times in rotating order; medians, and the ratios of issue 10's goals."""
    out: dict = {}
    methods: dict = {}
    if "random" not in args.skip:
        offsets = random_offsets(args.size)
        for name, fn in (("random ours", random_ours), ("random ours pread_into", random_ours_pread),
                         ("random libvhdi", random_libvhdi)):
            methods[name] = (lambda fn=fn: fn(image, offsets), len(offsets))
    if "chain" not in args.skip:
        t = time.perf_counter()
        paths = build_chain(workdir)
        log(f"chain: {len(paths)} layers in {paths[0].parent} (built/reused in {time.perf_counter() - t:.1f} s)")
        got = {chain_open_ours(paths), chain_open_libvhdi(paths)}
        if len(got) != 1:
            log("warning: the chain reads differently in vhdx and libvhdi")
        for name, fn in (("chain open ours", chain_open_ours), ("chain open libvhdi", chain_open_libvhdi)):
            methods[name] = (lambda fn=fn: timed(lambda: fn(paths)), None)
    if "startup" not in args.skip:
        for name in ("vhdx --help", "import vhdx", "python", "qemu-img --help"):
            time_startup(name)  # warm the caches
            methods[f"startup {name}"] = (lambda name=name: time_startup(name), None)
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(args.rounds if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c = cpu_seconds()
            times[name].append(methods[name][0]())
            cpu[name].append(cpu_seconds() - c)
    for name, ts in times.items():
        count = methods[name][1]
        med = statistics.median(ts)
        out[name] = {"median_s": med, "rounds_s": ts, "cpu_median_s": statistics.median(cpu[name]),
                     **({"ops_per_s": count / med} if count else {})}

    def q(a: str, b: str, key: str = "median_s"):
        return out[a][key] / out[b][key] if a in out and b in out else None
    out["ratios"] = {
        "random 4 KiB ops/s, ours / libvhdi (goal >= 1.0)": q("random libvhdi", "random ours"),
        "random 4 KiB ops/s, ours pread_into / libvhdi": q("random libvhdi", "random ours pread_into"),
        "64-deep chain open, time ours / libvhdi (goal <= 2)": q("chain open ours", "chain open libvhdi"),
        "64-deep chain open, CPU ours / libvhdi": q("chain open ours", "chain open libvhdi", "cpu_median_s"),
        "vhdx --help / qemu-img --help (time)": q("startup vhdx --help", "startup qemu-img --help"),
        "import vhdx / qemu-img --help (time)": q("startup import vhdx", "startup qemu-img --help"),
        "vhdx --help / python -c pass (time)": q("startup vhdx --help", "startup python"),
        "vhdx --help / python -c pass (CPU)": q("startup vhdx --help", "startup python", "cpu_median_s"),
    }
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def print_issue10(section: dict) -> None:
    print("\nissue 10: random reads (median s: CPU of the reading thread), deep-chain open and start-up "
          "(median s: wall; CPU s: user + system, children included)")
    print(f"{'method':<26}{'median s':>10}{'CPU s':>10}{'ops/s':>12}")
    for name, r in section.items():
        if name == "ratios":
            continue
        ops = f"{r['ops_per_s']:.0f}" if "ops_per_s" in r else "-"
        print(f"{name:<26}{r['median_s']:>10.4f}{r['cpu_median_s']:>10.4f}{ops:>12}")
    print("\nratios")
    for name, value in section["ratios"].items():
        print(f"  {name:<52}{'n/a' if value is None else f'{value:.2f}'}")


if __name__ == "__main__":
    sys.exit(main())
