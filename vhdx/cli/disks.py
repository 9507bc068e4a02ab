"""Verbs that make or copy disks: create, export, hash."""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..chains.resolve import open as open_disk
from ..ops.create import create
from ..errors import DiskExistsError, UsageError, VhdxError
from ..file.outputs import atomic_output
from . import EXIT_OK, add_chain_options, add_share_option, chain_options, emit_json, parse_size
from .progress import Progress, human_bytes

CHUNK = 2 << 20


def register(sub: Any) -> None:
    p = sub.add_parser("create", help="create a dynamic, fixed or differencing disk")
    p.add_argument("path")
    p.add_argument("size", nargs="?", type=parse_size, help="virtual size, e.g. 64M, 10G (not with --parent)")
    p.add_argument("--parent", help="make a differencing child of PARENT")
    p.add_argument("--block-size", type=parse_size, default=None, help="1M to 256M, power of two (default 32M)")
    p.add_argument("--logical-sector-size", type=int, choices=(512, 4096), default=None)
    p.add_argument("--physical-sector-size", type=int, choices=(512, 4096), default=None)
    p.add_argument("--fixed", action="store_true", help="allocate every block now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_create)

    for verb, helptext in (("export", "write the virtual disk to a sparse raw file"),
                           ("hash", "SHA-256 of the virtual disk")):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("path")
        if verb == "export":
            p.add_argument("out", help="output file ('-' for stdout)")
            p.add_argument("--format", choices=("raw",), default="raw")
            p.add_argument("--sha256", action="store_true", help="print the SHA-256 of the data as it streams")
            p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
        p.add_argument("--layer", type=int, default=0, help="export the disk as of layer N of its chain "
                       "(0 = the file itself, 1 = its parent, ...)")
        p.add_argument("--json", action="store_true")
        p.add_argument("--progress", dest="progress", action="store_true", default=None)
        p.add_argument("--no-progress", dest="progress", action="store_false")
        add_chain_options(p)
        add_share_option(p)
        p.set_defaults(func=cmd_export if verb == "export" else cmd_hash)


def cmd_create(args: argparse.Namespace) -> int:
    if args.parent:
        disk = create(args.path, args.size, parent=args.parent, block_size=args.block_size,
                          logical_sector_size=args.logical_sector_size,
                          physical_sector_size=args.physical_sector_size, fixed=args.fixed)
    else:
        if args.size is None:
            raise UsageError("give a size (e.g. 64M) or --parent", path=args.path)
        disk = create(args.path, args.size, block_size=args.block_size,
                          logical_sector_size=args.logical_sector_size,
                          physical_sector_size=args.physical_sector_size, fixed=args.fixed)
    with disk:
        info: dict[str, Any] = dict(path=disk.path, type=disk.disk_type, size=disk.size,
                                    block_size=disk.block_size, logical_sector_size=disk.logical_sector_size,
                                    data_write_guid=str(disk.data_write_guid))
    if args.json:
        emit_json(info)
    else:
        print(f"created {info['path']}: {info['type']}, {human_bytes(info['size'])}, "
              f"{human_bytes(info['block_size'])} blocks")
    return EXIT_OK


def _open_layer(args: argparse.Namespace):
    if args.layer < 0:
        raise UsageError(f"--layer {args.layer}: layers count from 0 (the file itself)", path=args.path)
    disk = open_disk(args.path, **chain_options(args))
    layer = args.layer
    target = disk
    for _ in range(layer):
        if target.parent is None:
            disk.close()
            raise UsageError(f"the chain has no layer {layer}", path=args.path)
        target = target.parent
    return disk, target


def chain_files(disk) -> list[str]:
    out = []
    while disk is not None:
        out.append(disk.path)
        disk = disk.parent
    return out


def refuse_chain_file(out: str, disk) -> None:
    """Never write over a file of the chain being read (evidence, or the data being exported)."""
    try:
        st = os.stat(out)
    except OSError:
        return
    for path in chain_files(disk):
        try:
            pst = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (pst.st_dev, pst.st_ino):
            raise UsageError(f"refusing to write over {path}, a file of the chain being read", path=out)


def stream(disk, sink=None, *, progress=None, hasher=None) -> tuple[int, int]:
    """Read the disk in pieces; hand non-zero pieces to ``sink(view, offset)``.

    Holes that no layer allocates are skipped without reading (and hashed as zeros when a
    hash is asked for), so the output is sparse. The sink runs on a second thread with its
    own buffers, so reading the next piece overlaps writing the last one (the system calls
    release the GIL). Returns (bytes covered, bytes handed to the sink).
    """
    size = disk.size
    written = 0
    position = 0
    zeros = memoryview(bytes(CHUNK))
    buffers = [bytearray(CHUNK) for _ in range(3)]
    pending: list[Future | None] = [None] * len(buffers)
    turn = 0

    def hash_zeros(upto: int) -> None:
        nonlocal position
        while position < upto:
            n = min(CHUNK, upto - position)
            if hasher is not None:
                hasher.update(zeros[:n])
            position += n
            if progress:
                progress(position, size)

    with ThreadPoolExecutor(max_workers=1) as pool:
        for start, length in disk.data_extents():
            hash_zeros(start)
            end = start + length
            while position < end:
                slot = turn % len(buffers)
                turn += 1
                waiting = pending[slot]
                if waiting is not None:
                    waiting.result()
                    pending[slot] = None
                view = memoryview(buffers[slot])
                n = disk.pread_into(view[:min(CHUNK, end - position)], position)
                piece = view[:n]
                if hasher is not None:
                    hasher.update(piece)
                if sink is not None and np.frombuffer(piece, np.uint8).any():
                    pending[slot] = pool.submit(sink, piece, position)
                    written += n
                position += n
                if progress:
                    progress(position, size)
        for fut in pending:
            if fut is not None:
                fut.result()
    hash_zeros(size)
    return position, written


def cmd_export(args: argparse.Namespace) -> int:
    disk, target = _open_layer(args)
    with disk:
        hasher = hashlib.sha256() if args.sha256 else None
        progress = Progress(f"export {os.path.basename(args.path)}", enabled=args.progress)
        if args.out == "-":
            out_fd = sys.stdout.buffer.fileno()

            def sink_stdout(view, offset):
                done = 0
                while done < len(view):
                    done += os.write(out_fd, view[done:])
            # stdout cannot be sparse: write every piece
            buf_size = target.size
            read, written = _stream_dense(target, sink_stdout, progress, hasher)
        else:
            refuse_chain_file(args.out, disk)
            try:
                written = _export_to(args, target, progress, hasher)
            except VhdxError:
                raise
            except OSError as e:
                raise VhdxError(f"cannot write the export: {e.strerror or e}", path=args.out) from e
            buf_size = target.size
        progress.finish()
    summary = dict(path=args.path, out=args.out, layer=args.layer, virtual_size=buf_size,
                   bytes_written=written, sha256=hasher.hexdigest() if hasher else None)
    if args.json:
        emit_json(summary)
    else:
        msg = f"exported {human_bytes(buf_size)} to {args.out} ({human_bytes(written)} of data)"
        print(msg, file=sys.stderr if args.out == "-" else sys.stdout)
        if hasher:
            print(f"sha256 {hasher.hexdigest()}", file=sys.stderr if args.out == "-" else sys.stdout)
    return EXIT_OK


def _export_to(args: argparse.Namespace, target, progress, hasher) -> int:
    """Write the disk to a regular file (sparse) or to a device or pipe (every byte, in order)."""
    try:
        st = os.stat(args.out)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        fd = os.open(args.out, os.O_WRONLY)
        try:
            def sink_dense(view, offset):
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            return _stream_dense(target, sink_dense, progress, hasher)[1]
        finally:
            os.close(fd)
    if not args.force and os.path.lexists(args.out):
        raise DiskExistsError("output exists; pass --force to overwrite it", path=args.out)
    # Built under a temporary name and renamed into place when complete: an interrupted or
    # failed export leaves nothing under OUT (with --force, the file it would have replaced).
    with atomic_output(args.out, overwrite=args.force) as out:
        if hasher is None and _kernel_copy_possible(target):
            written = _export_by_kernel_copy(target, out.fd, progress)
        else:
            written = stream(target, out.write_at, progress=progress, hasher=hasher)[1]
        os.ftruncate(out.fd, target.size)
    return written


def _kernel_copy_possible(disk) -> bool:
    """A single file, read straight from the host file (no parent, no in-memory log overlay)."""
    return (disk.parent is None and not disk.image.has_parent and disk.image.storage.fileno() is not None
            and hasattr(os, "copy_file_range"))


def _export_by_kernel_copy(disk, out_fd: int, progress) -> int:
    """Copy the allocated blocks of one file with copy_file_range; holes stay holes.

    Contiguous runs of FULLY_PRESENT blocks that sit back to back in the host file become one
    call. Blocks that read as zeros are not written at all (the output is sparse).
    """
    from ..format import constants as C
    im = disk.image
    bs, size = im.block_size, im.size
    st = im.payload_states()
    offs = im.payload_offsets().astype(np.int64)
    data = (st == C.PAYLOAD_BLOCK_FULLY_PRESENT) | (st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    # A run continues while the next block is data and sits right after this one in the file.
    follows = np.zeros(st.size, bool)
    if st.size > 1:
        follows[1:] = data[1:] & data[:-1] & (offs[1:] == offs[:-1] + bs)
    starts = np.flatnonzero(data & ~follows)
    src_fd = im.storage.fileno()
    written = 0
    for block in starts.tolist():
        end_block = block + 1
        while end_block < st.size and follows[end_block]:
            end_block += 1
        voff = block * bs
        length = min(end_block * bs, size) - voff
        src = int(offs[block])
        done = 0
        while done < length:
            n = os.copy_file_range(src_fd, out_fd, length - done, src + done, voff + done)
            if n <= 0:  # past the end of a short last block: the rest reads as zeros
                break
            done += n
        written += length
        if progress:
            progress(voff + length, size)
    if progress:
        progress(size, size)
    return written


def _stream_dense(disk, sink, progress, hasher) -> tuple[int, int]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while offset < disk.size:
        n = disk.pread_into(view, offset)
        if hasher is not None:
            hasher.update(view[:n])
        sink(view[:n], offset)
        offset += n
        if progress:
            progress(offset, disk.size)
    return offset, offset


def cmd_hash(args: argparse.Namespace) -> int:
    disk, target = _open_layer(args)
    with disk:
        hasher = hashlib.sha256()
        progress = Progress(f"hash {os.path.basename(args.path)}", enabled=args.progress)
        stream(target, None, progress=progress, hasher=hasher)
        progress.finish()
        size = target.size
    if args.json:
        emit_json(dict(path=args.path, layer=args.layer, virtual_size=size, sha256=hasher.hexdigest()))
    else:
        print(f"{hasher.hexdigest()}  {args.path}" + (f" (layer {args.layer})" if args.layer else ""))
    return EXIT_OK
