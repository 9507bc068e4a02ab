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

The page cache is warm (every file is read once before timing) and nothing is dropped:
the numbers compare CPU cost per byte, not disk speed. Prints the medians, MB/s (10^6
bytes per second of virtual disk; of the host file for cat) and time ratios; ``--json``
prints the same as JSON.

    python benchmarks/bench_read.py [--size 1G] [--rounds 3] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUF_SIZE = 4 << 20
BLOCK_SIZE = 32 << 20


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    return int(float(num) * units[unit])


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


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

def read_ours(path: Path, buf: bytearray, digest=None) -> int:
    import vhdx
    view = memoryview(buf)
    total = 0
    with vhdx.open(str(path)) as disk:
        while True:
            n = disk.readinto(view)
            if not n:
                break
            if digest is not None:
                digest.update(view[:n])
            total += n
    return total


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
    view = memoryview(buf)
    total = 0
    with open(path, "rb") as fh:
        disk = VHDX(fh)
        size = disk.size
        while total < size:
            n = disk.readinto(view[:min(len(view), size - total)])
            if not n:
                break
            if digest is not None:
                digest.update(view[:n])
            total += n
    return total


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
                    help="leave out a method: ours, libvhdi, dissect, cat, export-ours, export-qemu, "
                         "startup-ours")
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

    readers = {"ours": read_ours, "libvhdi": read_libvhdi, "dissect": read_dissect, "cat": read_cat}
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
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]     # rotate: no method always first
        for name in order:
            t = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t)
    out.unlink(missing_ok=True)

    file_size = image.stat().st_size
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        nbytes = {"cat": file_size, "startup-ours": 0}.get(name, size)
        results[name] = {"median_s": med, "min_s": min(ts), "rounds_s": ts, "bytes": nbytes,
                         "MB_per_s": nbytes / med / 1e6 if nbytes else None}

    def ratio(a: str, b: str):
        if a in results and b in results:
            return results[a]["median_s"] / results[b]["median_s"]
        return None

    ratios = {"ours/libvhdi": ratio("ours", "libvhdi"), "ours/dissect": ratio("ours", "dissect"),
              "ours/cat": ratio("ours", "cat"), "export ours/qemu-img": ratio("export-ours", "export-qemu")}
    report = {"virtual_size": size, "file_size": file_size, "buffer": BUF_SIZE, "rounds": args.rounds,
              "cache": "warm (nothing dropped)", "versions": versions(), "results": results,
              "ratios_of_median_time": ratios, "contents_sha256": digests, "export_sha256": export_digests}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    print(f"\n{args.rounds} rounds, alternating; warm page cache; 4 MiB reused buffer; "
          f"MB = 10^6 bytes of virtual disk (cat: of the {file_size}-byte host file)")
    print(f"{'method':<14}{'median s':>10}{'min s':>10}{'MB/s':>10}")
    for name, r in results.items():
        rate = "-" if r["MB_per_s"] is None else f"{r['MB_per_s']:.0f}"
        print(f"{name:<14}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{rate:>10}")
    print("\ntime ratios of medians (> 1: ours is slower)")
    for name, value in ratios.items():
        print(f"  {name:<22}{'n/a' if value is None else f'{value:.2f}'}")
    print("\nversions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
