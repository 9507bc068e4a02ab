"""The maintenance verbs: compact, resize, convert (Optimize-VHD, Resize-VHD, Convert-VHD)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import UsageError
from .common import (EXIT_OK, about, add_chain_options, add_progress_options, add_share_option,
                     chain_options, emit_json, parse_size)
from .progress import Progress, human_bytes


def register(sub: Any) -> None:
    """Add ``compact``, ``resize`` and ``convert`` to the command line."""
    _register_compact(sub)
    _register_resize(sub)
    _register_convert(sub)


def _register_compact(sub: Any) -> None:
    p = sub.add_parser("compact", help="give a dynamic disk's unused space back, like Optimize-VHD",
                       **about("Unallocate the blocks of DISK that read as zeros (in a differencing disk only "
                               "where its parent reads zeros too), move the blocks at the end of the file into "
                               "the holes and cut the file. What the disk reads does not change. Crash-safe: "
                               "after an interruption, run it again. A disk that other disks depend on is "
                               "refused unless --force.",
                               "vhdx compact disk.vhdx", "vhdx compact --dry-run ext4.vhdx",
                               "vhdx compact --trim --dry-run disk.vhdx"))
    p.add_argument("disk", help="the dynamic or differencing disk to compact")
    p.add_argument("--dry-run", action="store_true", help="say what would be done and write nothing")
    p.add_argument("--force", action="store_true", help="compact even though other disks depend on it")
    p.add_argument("--trim", action="store_true",
                   help="also unallocate the blocks that lie wholly in the free space of the disk's file systems "
                        "(ext2/3/4, FAT, NTFS; needs pytsk3: pip install 'vhdx[forensics]')")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_chain_options(p)
    add_progress_options(p)
    p.set_defaults(func=cmd_compact)


def _register_resize(sub: Any) -> None:
    p = sub.add_parser("resize", help="change a disk's virtual size, like Resize-VHD",
                       **about("Grow DISK to SIZE (any disk type; the new part reads zeros), or shrink it, "
                               "but not below its last non-zero byte (--min prints that size) unless "
                               "--allow-data-loss. Crash-safe: after an interruption, run it again. A disk that "
                               "other disks depend on is refused unless --force.",
                               "vhdx resize disk.vhdx 200G", "vhdx resize --min disk.vhdx",
                               "vhdx resize disk.vhdx $(vhdx resize --min --bytes disk.vhdx)"))
    p.add_argument("disk", help="the disk to resize")
    p.add_argument("size", nargs="?", type=parse_size, help="the new virtual size (e.g. 64G, 1T, 1048576)")
    p.add_argument("--min", action="store_true", help="print the smallest size DISK can shrink to, and exit")
    p.add_argument("--bytes", action="store_true", help="with --min: print the number of bytes only")
    p.add_argument("--allow-data-loss", action="store_true", help="shrink below the last non-zero byte")
    p.add_argument("--force", action="store_true", help="resize even though other disks depend on it")
    p.add_argument("--dry-run", action="store_true", help="check and say what would be done; write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_chain_options(p)
    p.set_defaults(func=cmd_resize)


def _register_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="copy a disk, a chain or a raw image into a new VHDX, like Convert-VHD",
                       **about("Write SRC (a VHDX with its parents, or a raw image with --from raw) as a new "
                               "standalone VHDX DST: dynamic (zero blocks stay unallocated) or fixed, with the "
                               "source's block size unless --block-size. The source is only read; DST appears "
                               "only when complete. Sector sizes and the disk identity are kept (--new-id for a "
                               "new identity).",
                               "vhdx convert disk_<GUID>.avhdx standalone.vhdx",
                               "vhdx convert --from raw --dynamic disk.img disk.vhdx",
                               "vhdx convert --fixed --block-size 2M --sha256 disk.vhdx fixed.vhdx"))
    p.add_argument("source", help="the VHDX/AVHDX (or, with --from raw, the raw image) to convert")
    p.add_argument("out", help="the new VHDX file")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--dynamic", dest="disk_type", action="store_const", const="dynamic", default="dynamic",
                      help="a dynamic disk (the default)")
    kind.add_argument("--fixed", dest="disk_type", action="store_const", const="fixed",
                      help="a fixed disk (every block allocated)")
    p.add_argument("--block-size", type=parse_size, help="the new block size (1M to 256M, a power of two)")
    p.add_argument("--from", dest="source_format", choices=("vhdx", "raw"), default="vhdx",
                   help="what SRC is (default: vhdx)")
    p.add_argument("--logical-sector-size", type=int, choices=(512, 4096),
                   help="for --from raw: the logical sector size (default 512)")
    p.add_argument("--layer", type=int, help="convert the disk as it is at layer N of its chain (0: SRC itself)")
    p.add_argument("--new-id", action="store_true", help="give the new disk a new identity (Page83Data)")
    p.add_argument("--sha256", action="store_true", help="print the SHA-256 of the virtual disk")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_chain_options(p)
    add_share_option(p)
    add_progress_options(p)
    p.set_defaults(func=cmd_convert)


def _search_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chain keywords compact and resize take (no missing parent, no share: they write)."""
    opts = chain_options(args)
    opts.pop("missing_parent", None)
    opts.pop("share", None)
    return opts


def cmd_compact(args: argparse.Namespace) -> int:
    """``vhdx compact``: compact (or plan, with --dry-run) and print what was reclaimed."""
    from ..ops.compact import compact
    progress = Progress(f"compact {os.path.basename(args.disk)}", enabled=args.progress)
    result = compact(args.disk, dry_run=args.dry_run, force=args.force, trim=args.trim, progress=progress,
                     **_search_options(args))
    progress.finish()
    if args.json:
        emit_json(result.to_dict())
        return EXIT_OK
    verb = "would reclaim" if result.dry_run else "reclaimed"
    print(f"{args.disk}: {verb} {human_bytes(result.bytes_reclaimed)} ({result.bytes_reclaimed} bytes): "
          f"{human_bytes(result.size_before)} -> {human_bytes(result.size_after)}; "
          f"{_unallocated(result)}, {result.moved_blocks} blocks moved ({human_bytes(result.bytes_moved)})")
    if result.trim is not None:
        for vol in result.trim:
            print(f"  volume at {vol['offset']} ({human_bytes(vol['length'])}): {vol['kind']}, "
                  f"{human_bytes(vol['free_bytes'])} free" + (f"; {vol['note']}" if vol['note'] else ""))
    if result.kept_nonzero_parent:
        print(f"  {result.kept_nonzero_parent} zero or free blocks kept: the parent does not read zeros there")
    if result.children:
        print(f"  note: {len(result.children)} disk(s) depend on it; what they read has not changed")
    if result.dry_run:
        print("dry run: nothing was written")
    return EXIT_OK


def _unallocated(result: Any) -> str:
    if result.trim is None:
        return f"{result.zero_blocks} zero blocks unallocated"
    return f"{result.zero_blocks} blocks unallocated ({result.trimmed_blocks} in file-system free space)"


def cmd_resize(args: argparse.Namespace) -> int:
    """``vhdx resize``: print the minimum (--min), or resize and print the sizes."""
    from ..ops.resize import minimum_size, resize
    if args.min:
        minimum = minimum_size(args.disk, **_search_options(args))
        if args.json:
            emit_json(dict(path=args.disk, minimum_size=minimum))
        elif args.bytes:
            print(minimum)
        else:
            print(f"{args.disk}: minimum size {human_bytes(minimum)} ({minimum} bytes)")
        return EXIT_OK
    if args.size is None:
        raise UsageError("resize needs a SIZE (or --min)", path=args.disk)
    result = resize(args.disk, args.size, allow_data_loss=args.allow_data_loss, force=args.force,
                    dry_run=args.dry_run, **_search_options(args))
    if args.json:
        emit_json(result.to_dict())
        return EXIT_OK
    verb = "would resize" if result.dry_run else "resized"
    print(f"{args.disk}: {verb} from {human_bytes(result.old_size)} ({result.old_size} bytes) to "
          f"{human_bytes(result.new_size)} ({result.new_size} bytes)"
          + ("; the BAT moved to the end of the file" if result.bat_moved else ""))
    if result.children:
        print(f"  WARNING: {len(result.children)} disk(s) depend on it and no longer match it: "
              + ", ".join(result.children))
    if result.dry_run:
        print("dry run: nothing was written")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    """``vhdx convert``: write the new VHDX and print what it holds."""
    from ..ops.convert import convert
    progress = Progress(f"convert {os.path.basename(args.source)}", enabled=args.progress)
    result = convert(args.source, args.out, disk_type=args.disk_type, block_size=args.block_size,
                     source_format=args.source_format, logical_sector_size=args.logical_sector_size,
                     new_id=args.new_id, sha256=args.sha256, overwrite=args.overwrite, progress=progress,
                     layer=args.layer, **chain_options(args))
    progress.finish()
    if args.json:
        emit_json(result.to_dict())
        return EXIT_OK
    print(f"{result.out}: {result.disk_type}, {human_bytes(result.size)} ({result.size} bytes), "
          f"{human_bytes(result.block_size)} blocks, {result.logical_sector_size}-byte sectors; "
          f"{result.blocks_written} blocks of data ({human_bytes(result.data_bytes)})")
    if result.sha256:
        print(f"sha256 {result.sha256}")
    return EXIT_OK
