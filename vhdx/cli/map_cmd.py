"""Forensic verbs: map (allocation per layer) and diff (what a checkpoint changed)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import DiskExistsError
from .common import (EXIT_OK, about, add_chain_options, add_share_option, chain_options, describing_options,
                     emit_json, missing_parent, missing_parent_line)
from .filediff_out import print_file_changes
from .progress import human_bytes


def register(sub: Any) -> None:
    """Add the ``map`` and ``diff`` verbs to the sub-parsers ``sub``."""
    p = sub.add_parser("map", help="which virtual ranges each layer of the chain holds", **about(
        "List, for each layer of the chain, the ranges of the virtual disk whose data that layer holds: "
        "what a read of each range is served from. --png draws it, one row per layer.",
        "vhdx map checkpoint.avhdx", "vhdx map --layer 0 --png layers.png checkpoint.avhdx"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    p.add_argument("--layer", type=int, default=None, help="only layer N (0 = the file itself)")
    p.add_argument("--json", action="store_true", help="print the ranges as JSON")
    p.add_argument("--png", metavar="FILE", help="also draw the allocation of every layer into FILE (PNG): "
                   "a labelled band per layer, an axis in bytes and a legend of the colours")
    p.add_argument("--svg", metavar="FILE", help="also draw the same picture into FILE as SVG")
    p.add_argument("--force", action="store_true", help="overwrite the --png or --svg FILE if it exists")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("diff", help="the sectors a checkpoint changed against its parent", **about(
        "List the sectors that a checkpoint holds itself, those written since it was taken: what a merge "
        "of it would copy. Every other sector reads through to its parent. A missing parent is no error here.",
        "vhdx diff checkpoint.avhdx", "vhdx diff --json checkpoint.avhdx"))
    p.add_argument("child", help="the differencing (.avhdx) file")
    p.add_argument("--json", action="store_true", help="print the ranges as JSON")
    p.add_argument("--files", action="store_true", help="list the files the checkpoint created, changed or "
                   "deleted (NTFS, FAT/exFAT, ext2/3/4; MBR and GPT): needs the parent and "
                   "pip install 'vhdx[forensics]'")
    p.add_argument("--system", action="store_true", help="with --files: also NTFS metafiles and TSK's $-entries")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_diff)


def cmd_map(args: argparse.Namespace) -> int:
    """``vhdx map``: the ranges each layer holds (and, with ``--png``/``--svg``, a picture of them)."""
    from ..chains.resolve import open as open_disk
    from ..ops.maps import map_layers
    from ..ops.pictures import write_picture
    with open_disk(args.path, **describing_options(args)) as disk:
        missing = missing_parent(disk.chain_info)
        maps = map_layers(disk, args.layer)
        result = [m.to_dict() for m in maps]
        for kind, path in (("png", args.png), ("svg", args.svg)):
            if path:
                try:
                    write_picture(path, maps, disk, overwrite=args.force, kind=kind)
                except DiskExistsError as e:
                    raise DiskExistsError("the picture file exists; pass --force to overwrite it", path=e.path) from e
    if args.json:
        emit_json(dict(path=args.path, layers=result, **({"missing_parent": missing} if missing else {})))
        return EXIT_OK
    for layer in result:
        print(f"layer {layer['layer']}: {layer['path']} [{layer['disk_type']}]")
        print("  totals: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in layer["totals"].items()))
        for r in layer["ranges"]:
            print(f"  {r['start']:>16} +{r['length']:<14} sectors {r['first_sector']}+{r['sectors']:<10} {r['state']}")
    if missing:
        print(missing_parent_line(missing), end="")
    for path in (args.png, args.svg):
        if path:
            print(f"picture written to {path}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    """``vhdx diff``: the sectors a checkpoint changed against its parent (a missing parent reads as zeros)."""
    from ..chains.resolve import open as open_disk
    from ..ops.maps import changed_ranges
    if args.files:
        return print_file_changes(args)
    opts = chain_options(args)
    opts.setdefault("missing_parent", "zeros")
    with open_disk(args.child, **opts) as disk:
        im = disk.image
        ranges = changed_ranges(im)
        ss = im.logical_sector_size
    total = sum(r.length for r in ranges)
    if args.json:
        emit_json(dict(child=args.child, sector_size=ss, changed_bytes=total,
                       changed_sectors=total // ss, ranges=[r.to_dict() for r in ranges]))
        return EXIT_OK
    print(f"{args.child}: {total // ss} sectors ({human_bytes(total)}) changed against its parent")
    for r in ranges:
        d = r.to_dict()
        print(f"  sectors {d['first_sector']}..{d['first_sector'] + d['sectors'] - 1} "
              f"(bytes {r.start}+{r.length}) {r.state}")
    return EXIT_OK
