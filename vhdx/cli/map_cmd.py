"""Forensic verbs: map (allocation per layer) and diff (what a checkpoint changed)."""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

from ..chains.resolve import open as open_disk
from ..errors import DiskExistsError, VhdxError
from ..ops.export import refuse_chain_file
from ..ops.maps import changed_ranges, layer_ranges, merged_ranges, render_png, summary
from ..file.outputs import atomic_output
from . import EXIT_OK, add_chain_options, add_share_option, chain_options, emit_json
from .progress import human_bytes


def register(sub: Any) -> None:
    p = sub.add_parser("map", help="which virtual ranges each layer of the chain holds")
    p.add_argument("path")
    p.add_argument("--layer", type=int, default=None, help="only layer N (0 = the file itself)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--png", metavar="FILE", help="also draw the allocation of every layer into FILE")
    p.add_argument("--force", action="store_true", help="overwrite the --png FILE if it exists")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("diff", help="the sectors a checkpoint changed against its parent")
    p.add_argument("child")
    p.add_argument("--json", action="store_true")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_diff)


def _layers(disk) -> list:
    out = []
    d = disk
    while d is not None:
        out.append(d)
        d = d.parent
    return out


def cmd_map(args: argparse.Namespace) -> int:
    opts = chain_options(args)
    with open_disk(args.path, **opts) as disk:
        layers = _layers(disk)
        chosen = range(len(layers)) if args.layer is None else [args.layer]
        result = []
        pictures = []
        for n in chosen:
            if n < 0 or n >= len(layers):
                from ..errors import UsageError
                raise UsageError(f"the chain has {len(layers)} layers; no layer {n}", path=args.path)
            im = layers[n].image
            ranges = merged_ranges(layer_ranges(im))
            result.append(dict(layer=n, path=im.path, disk_type=im.disk_type, virtual_size=im.size,
                               sector_size=im.logical_sector_size, totals=summary(ranges),
                               ranges=[r.to_dict() for r in ranges]))
            pictures.append((im.path, ranges, im.size))
        if args.png:
            refuse_chain_file(args.png, disk)
            if os.path.lexists(args.png) and not args.force:
                raise DiskExistsError("the picture file exists; pass --force to overwrite it", path=args.png)
            _write_picture(args.png, render_png(pictures), overwrite=args.force)
    if args.json:
        emit_json(dict(path=args.path, layers=result))
        return EXIT_OK
    for layer in result:
        print(f"layer {layer['layer']}: {layer['path']} [{layer['disk_type']}]")
        print("  totals: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in layer["totals"].items()))
        for r in layer["ranges"]:
            print(f"  {r['start']:>16} +{r['length']:<14} sectors {r['first_sector']}+{r['sectors']:<10} {r['state']}")
    if args.png:
        print(f"picture written to {args.png}")
    return EXIT_OK


def _write_picture(path: str, data: bytes, *, overwrite: bool) -> None:
    """The picture appears under ``path`` complete, or not at all (a device or pipe is written to)."""
    try:
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
            with open(path, "wb") as f:
                f.write(data)
            return
        with atomic_output(path, overwrite=overwrite) as out:
            out.write_at(data, 0)
    except VhdxError:
        raise
    except OSError as e:
        raise VhdxError(f"cannot write the picture: {e.strerror or e}", path=path) from e


def cmd_diff(args: argparse.Namespace) -> int:
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
