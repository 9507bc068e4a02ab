"""Verbs that make or copy disks: create, export, hash."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import DiskExistsError, UsageError
from .common import (EXIT_OK, about, add_chain_options, add_progress_options, add_share_option, chain_options,
                     emit_json, parse_size)
from .progress import Progress, human_bytes


def register(sub: Any) -> None:
    """Add the ``create``, ``export`` and ``hash`` verbs to the sub-parsers ``sub``."""
    p = sub.add_parser("create", help="create a dynamic, fixed or differencing disk", **about(
        "Create a new VHDX file: dynamic (blocks allocated as they are written) unless --fixed, or a "
        "differencing child of --parent that reads through to it. An existing file is never overwritten.",
        "vhdx create disk.vhdx 64G", "vhdx create --fixed --block-size 1M small.vhdx 100M",
        "vhdx create --parent disk.vhdx child.avhdx"))
    p.add_argument("path", help="the file to create")
    p.add_argument("size", nargs="?", type=parse_size, help="virtual size, e.g. 64M, 10G (not with --parent)")
    p.add_argument("--parent", help="make a differencing child of PARENT")
    p.add_argument("--block-size", type=parse_size, default=None, help="1M to 256M, power of two (default 32M)")
    p.add_argument("--logical-sector-size", type=int, choices=(512, 4096), default=None,
                   help="the sector size the guest sees (default 512; a child takes its parent's)")
    p.add_argument("--physical-sector-size", type=int, choices=(512, 4096), default=None,
                   help="the sector size reported as physical (default 4096)")
    p.add_argument("--fixed", action="store_true", help="allocate every block now")
    p.add_argument("--json", action="store_true", help="print the new disk as JSON")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("export", help="write the virtual disk to a sparse raw file", **about(
        "Write the virtual disk as a raw image, as the guest sees it through the whole chain: a sparse "
        "file (holes where nothing was written) that appears only when complete, or a stream to stdout or "
        "a device. --layer exports the disk as it was at an older layer of its chain.",
        "vhdx export checkpoint.avhdx disk.raw", "vhdx export --sha256 disk.vhdx - | gzip > disk.raw.gz"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    p.add_argument("out", help="output file ('-' for stdout)")
    p.add_argument("--format", choices=("raw",), default="raw", help="the output format (only raw)")
    p.add_argument("--sha256", action="store_true", help="print the SHA-256 of the data as it streams")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _add_reading_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("hash", help="SHA-256 of the virtual disk", **about(
        "Print the SHA-256 of the virtual disk through its whole chain: the same as sha256sum of its raw "
        "export, without writing one. Holes are hashed as zeros without being read. Two disks, or a disk "
        "before and after a merge, read the same exactly when their hashes are equal.",
        "vhdx hash checkpoint.avhdx", "vhdx hash --layer 1 checkpoint.avhdx"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    _add_reading_options(p)
    p.set_defaults(func=cmd_hash)


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    """What export and hash share: --layer, --json, the progress bar and the chain options."""
    p.add_argument("--layer", type=int, default=0, help="export the disk as of layer N of its chain "
                   "(0 = the file itself, 1 = its parent, ...)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_progress_options(p)
    add_chain_options(p)
    add_share_option(p)


def cmd_create(args: argparse.Namespace) -> int:
    """``vhdx create``: a new dynamic, fixed or (with ``--parent``) differencing disk."""
    from ..ops.create import create
    if not args.parent and args.size is None:
        raise UsageError("give a size (e.g. 64M) or --parent", path=args.path)
    with create(args.path, args.size, parent=args.parent or None, block_size=args.block_size,
                logical_sector_size=args.logical_sector_size, physical_sector_size=args.physical_sector_size,
                fixed=args.fixed) as disk:
        info: dict[str, Any] = dict(path=disk.path, type=disk.disk_type, size=disk.size,
                                    block_size=disk.block_size, logical_sector_size=disk.logical_sector_size,
                                    data_write_guid=str(disk.data_write_guid))
    if args.json:
        emit_json(info)
    else:
        print(f"created {info['path']}: {info['type']}, {human_bytes(info['size'])}, "
              f"{human_bytes(info['block_size'])} blocks")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``vhdx export``: write the disk (as of ``--layer``) to OUT, or to stdout for ``-``."""
    from ..ops.export import export
    out = sys.stdout.buffer.fileno() if args.out == "-" else args.out
    progress = Progress(f"export {os.path.basename(args.path)}", enabled=args.progress)
    try:
        result = export(args.path, out, layer=args.layer, sha256=args.sha256, overwrite=args.force,
                        progress=progress, **chain_options(args))
    except DiskExistsError as e:
        raise DiskExistsError("output exists; pass --force to overwrite it", path=e.path) from e
    finally:
        progress.finish()
    if args.json:
        emit_json(dict(path=args.path, out=args.out, layer=args.layer, virtual_size=result.size,
                       bytes_written=result.bytes_written, data_bytes=result.data_bytes, method=result.method,
                       sha256=result.sha256))
        return EXIT_OK
    where = sys.stderr if args.out == "-" else sys.stdout
    print(f"exported {human_bytes(result.size)} to {args.out} ({human_bytes(result.data_bytes)} of data)",
          file=where)
    if result.sha256:
        print(f"sha256 {result.sha256}", file=where)
    return EXIT_OK


def cmd_hash(args: argparse.Namespace) -> int:
    """``vhdx hash``: the SHA-256 of the disk (as of ``--layer``)."""
    from ..ops.export import hash as hash_disk
    from ..ops.export import open_layer
    progress = Progress(f"hash {os.path.basename(args.path)}", enabled=args.progress)
    try:
        with open_layer(args.path, args.layer, **chain_options(args)) as (_, target):
            digest = hash_disk(target, progress=progress)
            size = target.size
    finally:
        progress.finish()
    if args.json:
        emit_json(dict(path=args.path, layer=args.layer, virtual_size=size, sha256=digest))
    else:
        print(f"{digest}  {args.path}" + (f" (layer {args.layer})" if args.layer else ""))
    return EXIT_OK
