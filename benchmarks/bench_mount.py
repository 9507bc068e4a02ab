#!/usr/bin/env python3
"""``vhdx mount`` against ``vhdx export`` and libvhdi's ``vhdimount``, and ``diff --files`` at size.

(a) Sequential read of a 2 GiB two-layer chain (base: every other 32 MiB block written; the
    checkpoint: 256 MiB of 64 KiB writes scattered over it, so it has partial blocks):
    ``dd bs=1M`` of the leaf through ``vhdx mount`` (``disk``), ``vhdx export CHILD /dev/null``
    (a device: written densely, every byte) and ``dd`` through ``vhdimount`` of the same chain
    (its last ``vhdiN`` file, the leaf; it too shows one file per layer). Each reader's bytes are hashed once first and must agree; the timed
    runs are warm (page cache of the VHDX files warm, the FUSE files re-opened, and the kernel's
    cache of the FUSE file dropped by the unmount/mount between rounds).
(b) ``vhdx diff --files`` on a 16 GiB disk holding ext4, whose checkpoint changed 200 MiB of
    files: the file system is made and changed through ``vhdx mount --rw`` and a loop mount of
    ``disk`` (so this also exercises the writable mount). Goal: under 10 s.

Needs root, FUSE (fuse3, mfusepy), libvhdi-utils (vhdimount), e2fsprogs and pytsk3.

    python benchmarks/bench_mount.py [--size 2G] [--rounds 3] [--workdir DIR] [--skip-diff]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vhdx  # noqa: E402

MiB = 1 << 20
ENV = dict(os.environ, PYTHONPATH=str(REPO), PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=ENV, **kw)


def vhdx_cli(*argv: str) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "vhdx", *argv)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_chain(work: Path, size: int) -> Path:
    base = work / "base.vhdx"
    rng = random.Random(1)
    with vhdx.create(base, size, block_size=32 * MiB) as d:
        piece = rng.randbytes(8 * MiB)
        for block in range(0, size // (32 * MiB), 2):
            for k in range(4):
                d.pwrite(piece, block * 32 * MiB + k * 8 * MiB)
    child = Path(vhdx.snapshot(base))
    with vhdx.open(child, "r+") as d:
        piece = rng.randbytes(64 * 1024)
        for _ in range(256 * MiB // len(piece)):
            d.pwrite(piece, rng.randrange(0, size // 65536) * 65536)
    return child


def sha_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def dd(path: Path) -> None:
    sh("dd", f"if={path}", "of=/dev/null", "bs=1M")


class Mount:
    def __init__(self, kind: str, disk: Path, mnt: Path) -> None:
        self.kind, self.disk, self.mnt = kind, disk, mnt
        mnt.mkdir(exist_ok=True)

    def __enter__(self) -> Path:
        if self.kind == "ours":
            vhdx_cli("mount", str(self.disk), str(self.mnt))
            return self.mnt / "disk"
        sh("vhdimount", str(self.disk), str(self.mnt))   # vhdi1 is the base, the highest vhdiN the leaf
        for _ in range(200):
            layers = sorted(self.mnt.glob("vhdi*"), key=lambda p: int(p.name[4:]))
            if layers:
                return layers[-1]
            time.sleep(0.05)
        raise RuntimeError("vhdimount shows no file")

    def __exit__(self, *exc) -> None:
        if self.kind == "ours":
            vhdx_cli("unmount", str(self.mnt))
        else:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False, capture_output=True)
            time.sleep(0.2)


def bench_read(work: Path, size: int, rounds: int) -> None:
    child = build_chain(work, size)
    print(f"chain: {child.name} over base.vhdx, {size / MiB:.0f} MiB virtual")
    want = vhdx.hash(child)
    for kind in ("ours", "vhdimount"):
        with Mount(kind, child, work / f"mnt-{kind}") as f:
            got = sha_of(f)
            print(f"  {kind}: sha256 {got[:16]}... {'ok' if got == want else 'DIFFERENT'}")
    times: dict[str, list[float]] = {"mount (ours)": [], "export (ours)": [], "vhdimount": []}
    for _ in range(rounds):
        with Mount("ours", child, work / "mnt-ours") as f:
            times["mount (ours)"].append(timed(lambda: dd(f)))
        times["export (ours)"].append(timed(lambda: vhdx_cli("export", str(child), "/dev/null")))
        with Mount("vhdimount", child, work / "mnt-vhdimount") as f:
            times["vhdimount"].append(timed(lambda: dd(f)))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, t in med.items():
        print(f"  {k:<14} {t:7.3f} s  {size / t / 1e6:8.1f} MB/s   (runs: {', '.join(f'{x:.3f}' for x in times[k])})")
    print(f"  throughput mount/vhdimount: {med['vhdimount'] / med['mount (ours)']:.2f} x (goal >= 0.8)")
    print(f"  throughput mount/export:    {med['export (ours)'] / med['mount (ours)']:.2f} x")


def diff_files(child: Path, code: Path = REPO) -> tuple[float, dict]:
    """(seconds, JSON) of ``vhdx diff CHILD --files --json`` run from the tree ``code``."""
    env = dict(ENV, PYTHONPATH=str(code))
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vhdx", "diff", str(child), "--files", "--json"], check=True,
                          capture_output=True, text=True, env=env, cwd=str(code))
    return time.perf_counter() - t, json.loads(done.stdout)


def report_diff(label: str, child: Path, old_code: Path | None) -> None:
    t, out = diff_files(child)
    vol = next(v for v in out["volumes"] if v.get("fs_type"))
    counts = {k: sum(1 for f in out["files"] if f["change"] == k) for k in ("created", "changed", "deleted")}
    cost = {k: vol[k] for k in ("method", "records_changed", "records_examined", "names_listed", "folder_walk")
            if k in vol}
    print(f"  {label}: diff --files {t:.2f} s; checkpoint wrote {out['changed_bytes'] / MiB:.1f} MiB; {counts}; {cost}")
    if old_code:
        t_old, old = diff_files(child, old_code)
        same = sorted((f["change"], f["path"]) for f in old["files"]) == \
            sorted((f["change"], f["path"]) for f in out["files"])
        print(f"    the same with {old_code} (walks every name): {t_old:.2f} s; same files: {same}")


class ExtOnMount:
    """An ext4 file system inside a VHDX, changed through ``vhdx mount --rw`` and a loop mount."""

    def __init__(self, work: Path) -> None:
        self.mnt, self.fsdir = work / "mnt-rw", work / "fs"
        self.fsdir.mkdir(exist_ok=True)

    def run(self, disk: Path, action, mkfs: bool = False) -> float:
        self.mnt.mkdir(exist_ok=True)
        t = time.perf_counter()
        vhdx_cli("mount", "--rw", str(disk), str(self.mnt))
        try:
            if mkfs:
                sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(self.mnt / "disk"))
            sh("mount", "-o", "loop,noinit_itable", str(self.mnt / "disk"), str(self.fsdir))
            try:
                action(self.fsdir)
            finally:
                sh("umount", str(self.fsdir))
        finally:
            vhdx_cli("unmount", str(self.mnt))
        return time.perf_counter() - t


def bench_diff(work: Path, old_code: Path | None) -> None:
    """(b) 16 GiB ext4, 2,000 files, a checkpoint of about 200 MiB; (c) the same disk with 100,000
    small files, a checkpoint that creates 10 and changes 10 in place."""
    rng = random.Random(2)
    ext = ExtOnMount(work)

    def populate(root: Path) -> None:
        for d in range(20):
            (root / f"d{d}").mkdir()
            for f in range(100):
                (root / f"d{d}" / f"f{f}.bin").write_bytes(rng.randbytes(rng.randrange(1, 400_000)))

    def change(root: Path) -> None:
        written, n = 0, 0
        (root / "new").mkdir()
        while written < 150 * MiB:
            data = rng.randbytes(4 * MiB)
            (root / "new" / f"n{n}.bin").write_bytes(data)
            written += len(data)
            n += 1
        for k in range(200):
            p = root / f"d{k % 20}" / f"f{k // 20}.bin"
            with open(p, "r+b") as f:
                f.write(rng.randbytes(min(p.stat().st_size, 256 * 1024)))
        for k in range(50):
            (root / f"d{k % 20}" / f"f{99 - k}.bin").unlink()

    def many(root: Path) -> None:
        for d in range(100):
            (root / f"m{d}").mkdir()
            for f in range(1000):
                (root / f"m{d}" / f"s{f}.txt").write_bytes(b"%d/%d\n" % (d, f) * 64)

    def few(root: Path) -> None:
        for k in range(10):
            (root / f"m{k * 7}" / f"added{k}.txt").write_bytes(b"new\n")
            with open(root / f"m{k * 9}" / f"s{k * 31}.txt", "r+b") as f:
                f.write(b"CHANGED")

    base = work / "fs16.vhdx"
    with vhdx.create(base, 16 << 30):
        pass
    print(f"16 GiB ext4 base (2,000 files) made through vhdx mount --rw in {ext.run(base, populate, mkfs=True):.1f} s")
    child = Path(vhdx.snapshot(base))
    print(f"checkpoint (~200 MiB) written through the mount in {ext.run(child, change):.1f} s")
    report_diff("16 GiB ext4, 2,000 files, ~200 MiB changed (goal < 10 s)", child, old_code)
    child2 = Path(vhdx.snapshot(child))
    print(f"100,000 small files added through the mount in {ext.run(child2, many):.1f} s")
    child3 = Path(vhdx.snapshot(child2))
    ext.run(child3, few)
    report_diff("102,000 files, 10 created + 10 changed in place", child3, old_code)


def write_round(code: Path, child: Path, mnt: Path, source: Path, how: str) -> tuple[float, float]:
    """(seconds for the dd with its fsync, seconds for the unmount) of one write of ``source``
    into ``child`` through ``vhdx mount --rw`` run from the tree ``code``: ``dd bs=1M`` to
    ``disk`` (FUSE requests of 128 KiB) or through a loop device over ``disk`` (4 KiB pages)."""
    env = dict(ENV, PYTHONPATH=str(code))
    # cwd too: ``python -m vhdx`` puts the current folder first on sys.path
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True, text=True, env=env,  # noqa: E731
                                       cwd=str(code))
    mnt.mkdir(exist_ok=True)
    run(sys.executable, "-m", "vhdx", "mount", "--rw", str(child), str(mnt))
    loop = ""
    try:
        target = mnt / "disk"
        if how == "loop":
            loop = run("losetup", "-f", "--show", str(target)).stdout.strip()
            target = Path(loop)
        took = timed(lambda: run("dd", f"if={source}", f"of={target}", "bs=1M", "conv=fsync,notrunc"))
    finally:
        if loop:
            run("losetup", "-d", loop)
        t = time.perf_counter()
        run(sys.executable, "-m", "vhdx", "unmount", str(mnt))
        gone = time.perf_counter() - t
    return took, gone


def bench_write(work: Path, old_code: Path | None, rounds: int, mib: int = 128) -> None:
    """Writes through ``vhdx mount --rw`` into a fresh checkpoint of a 4 GiB disk, MiB/s: this
    tree against ``old_code`` (a tree before the write buffer), rounds interleaved."""
    base = work / "wbase.vhdx"
    with vhdx.create(base, 4 << 30):
        pass
    source = work / "payload.bin"
    source.write_bytes(os.urandom(mib * MiB))
    codes = {"buffered (this tree)": REPO}
    if old_code:
        codes["one transaction per write (old)"] = old_code
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for how in ("dd bs=1M to disk", "loop device"):
            for label, code in codes.items():
                child = work / "wchild.avhdx"
                child.unlink(missing_ok=True)
                vhdx.create(child, parent=base).close()
                times.setdefault((how, label), []).append(
                    write_round(code, child, work / "mnt-w", source, "loop" if how == "loop device" else "dd"))
                check = subprocess.run([sys.executable, "-m", "vhdx", "check", str(child)], env=ENV,
                                       capture_output=True, text=True)
                assert check.returncode == 0, check.stdout + check.stderr
    print(f"write {mib} MiB through vhdx mount --rw into a new checkpoint (medians of {rounds}):")
    for (how, label), runs in times.items():
        dd_s = statistics.median(r[0] for r in runs)
        um_s = statistics.median(r[1] for r in runs)
        print(f"  {how:<17} {label:<32} dd+fsync {dd_s:7.2f} s  {mib / dd_s:7.1f} MiB/s   unmount {um_s:5.2f} s"
              f"   (runs: {', '.join(f'{r[0]:.2f}' for r in runs)})")
    source.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="2G")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir")
    p.add_argument("--skip-diff", action="store_true")
    p.add_argument("--skip-read", action="store_true")
    p.add_argument("--write", action="store_true", help="only the --rw write benchmark")
    p.add_argument("--old-code", help="a tree of vhdx to compare the writes with (git archive of an older commit)")
    a = p.parse_args()
    size = int(float(a.size.rstrip("GgMm")) * (1 << 30 if a.size[-1] in "Gg" else MiB))
    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="bench-mount-") as work:
        if a.write:
            bench_write(Path(work), Path(a.old_code) if a.old_code else None, a.rounds)
            return
        if not a.skip_read:
            bench_read(Path(work), size, a.rounds)
        if not a.skip_diff:
            bench_diff(Path(work), Path(a.old_code) if a.old_code else None)


if __name__ == "__main__":
    main()
