"""Mount verbs: mount (every layer of a chain as a file, over FUSE) and unmount."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError
from .common import EXIT_OK, about, add_chain_options, add_share_option, chain_options


def register(sub: Any) -> None:
    """Add the ``mount`` and ``unmount`` verbs to the sub-parsers ``sub``."""
    p = sub.add_parser("mount", help="every layer of a chain as a file, over FUSE", **about(
        "Mount the chain of DISK at MOUNTPOINT: one file per layer, named after the layer's file, each the "
        "whole virtual disk as it reads at that layer (the base alone, then with each checkpoint), and "
        "'disk', the leaf. Read-only unless --rw: files are opened read-only and a dirty log is replayed in "
        "memory. With --rw, 'disk' is writable through the normal write path; parents are never written. "
        "Returns once the mount is ready; 'vhdx unmount MOUNTPOINT' ends it. Needs FUSE: "
        "pip install 'vhdx[mount]' and libfuse3 (Debian: apt-get install fuse3).",
        "vhdx mount checkpoint.avhdx /mnt/layers",
        "mount -o ro,loop,offset=1048576 /mnt/layers/disk /mnt/c", "vhdx unmount /mnt/layers"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    p.add_argument("mountpoint", help="an existing folder")
    p.add_argument("--rw", action="store_true", help="make 'disk' (the leaf) writable; parents stay read-only")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (as root, or with user_allow_other in /etc/fuse.conf)")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", help="end a vhdx mount", **about(
        "Unmount a vhdx mount point and wait until its server has closed the disk (log clean, locks "
        "released).", "vhdx unmount /mnt/layers"))
    p.add_argument("mountpoint", help="the folder given to vhdx mount")
    p.set_defaults(func=cmd_unmount)


def cmd_mount(args: argparse.Namespace) -> int:
    """``vhdx mount``: serve the chain's layers as files."""
    from ..ops.mount import mount
    if args.rw and args.force_share:
        raise UsageError("--rw and --force-share exclude each other: a writer never shares the disk")
    mount(args.path, args.mountpoint, foreground=args.foreground, rw=args.rw, allow_other=args.allow_other,
          **chain_options(args))
    return EXIT_OK


def cmd_unmount(args: argparse.Namespace) -> int:
    """``vhdx unmount``: unmount and wait for the server to close the chain."""
    from ..ops.mount import unmount
    unmount(args.mountpoint)
    return EXIT_OK
