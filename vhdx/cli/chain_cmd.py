"""Chain verbs: chain, snapshot, reparent, orphans."""

from __future__ import annotations

import argparse
import os
import shlex
from typing import TYPE_CHECKING, Any

from .common import (EXIT_FINDINGS, EXIT_OK, about, add_chain_options, add_progress_options, add_share_option,
                     chain_options, emit_json, parse_size)
from .merge_cmd import merge_plans

if TYPE_CHECKING:
    from ..chains.resolve import Layer
    from ..ops.orphans import Forest, Node


def register(sub: Any) -> None:
    """Add the chain verbs (chain, snapshot, reparent, orphans) to the ``vhdx`` parser."""
    p = sub.add_parser("chain", help="show a disk's chain of parents and how each was found", **about(
        "Show the chain of a disk from the file given down to its base: each layer's type and "
        "DataWriteGuid, how its parent was found (relative path, absolute path, a DataWriteGuid scan of "
        "a folder) and every path tried for a parent that is missing or does not match. A broken link is "
        "shown, not raised.", "vhdx chain checkpoint.avhdx", "vhdx chain --search /backup checkpoint.avhdx"))
    p.add_argument("path", help="the .vhdx or .avhdx file (usually the newest checkpoint)")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("snapshot", help="make a Hyper-V style checkpoint child <stem>_<GUID>.avhdx beside DISK",
                       **about("Take a checkpoint as Hyper-V does: a new differencing file <stem>_<GUID>.avhdx "
                               "beside DISK whose parent is DISK. From then on write to the new file, not to "
                               "DISK (writing to DISK would break the checkpoint); merge folds it back.",
                               "vhdx snapshot disk.vhdx"))
    p.add_argument("disk", help="the disk (or newest checkpoint) to take a checkpoint of")
    p.add_argument("--block-size", default=None, help="child block size (default 2M, as Hyper-V)")
    p.add_argument("--json", action="store_true", help="print the new file as JSON")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("reparent", help="point a child at another parent file (like Set-VHD -ParentPath)",
                       **about("Rewrite a child's parent locator to name another parent file, for a parent "
                               "that was moved, copied or restored. The new parent must carry the "
                               "DataWriteGuid the child expects, unless --ignore-id-mismatch (only if its "
                               "data is the same as the original parent's).",
                               "vhdx reparent checkpoint.avhdx --parent /backup/disk.vhdx"))
    p.add_argument("child", help="the differencing (.avhdx) file to point elsewhere")
    p.add_argument("--parent", required=True, help="the new parent")
    p.add_argument("--ignore-id-mismatch", action="store_true",
                   help="link even though the parent's DataWriteGuid differs (rewrites the linkage)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_reparent)

    p = sub.add_parser("orphans", help="find every chain in a folder: bases, checkpoints, branches, broken links",
                       **about("Read every VHDX and AVHDX file of a folder and draw the trees they form: base "
                               "disks, their checkpoints, branches, and the checkpoints whose parent is missing "
                               "or changed (orphans), with the command that merges each chain. Nothing is "
                               "written unless --merge.", "vhdx orphans /var/lib/hyperv/disks",
                               "vhdx orphans -r --json ."))
    p.add_argument("folder", help="the folder to read")
    p.add_argument("--recursive", "-r", action="store_true", help="read the folders below it too")
    p.add_argument("--json", action="store_true", help="print the trees as JSON")
    p.add_argument("--merge", action="store_true", help="merge every unambiguous chain after showing the plan")
    p.add_argument("--yes", action="store_true", help="with --merge: do not ask for confirmation")
    add_progress_options(p)
    p.set_defaults(func=cmd_orphans)


MAX_INDENT = 32  # deeper levels of a tree are drawn at this indent, with their level number


def indent(depth: int, unit: str) -> str:
    """The indent of a tree line: ``unit`` per level, capped so that deep chains stay readable."""
    if depth <= MAX_INDENT:
        return unit * depth
    return unit * MAX_INDENT + f"(level {depth}) "


def cmd_chain(args: argparse.Namespace) -> int:
    """``vhdx chain PATH``: each layer, how its parent was found, and what is broken."""
    from ..chains.resolve import chain
    from ..ops.merge.journal import interrupted_merge_at
    options = chain_options(args)
    ch = chain(args.path, **options)
    interrupted = {layer.path: interrupted_merge_at(layer.path, share=bool(options.get("share")))
                   for layer in ch.layers}
    if args.json:
        d = ch.to_dict()
        for layer in d["layers"]:
            layer["interrupted_merge"] = interrupted[layer["path"]]
        emit_json(d)
    else:
        for depth, layer in enumerate(ch.layers):
            _print_layer(depth, layer, interrupted[layer.path])
        print("chain complete" if ch.complete else "chain BROKEN")
    return EXIT_OK if ch.complete else EXIT_FINDINGS


def _print_layer(depth: int, layer: Layer, interrupted: bool) -> None:
    """One layer of ``vhdx chain``: the file, how it was found, and its broken link if any."""
    pad = indent(depth, "  ")
    flags = []
    if interrupted:
        flags.append("INTERRUPTED MERGE")
    if layer.note:
        flags.append(layer.note)
    print(f"{pad}{'└─ ' if depth else ''}{layer.path}  [{layer.disk_type}, DataWriteGuid "
          f"{layer.data_write_guid}]" + (f"  ({'; '.join(flags)})" if flags else ""))
    if depth:
        print(f"{pad}   found by {layer.found_by}")
    if layer.linkage == "missing":
        print(f"{pad}   PARENT MISSING: parent_linkage {layer.parent_linkage}; tried:")
        for t in layer.tried:
            print(f"{pad}     {t}")
    elif layer.linkage == "mismatch":
        print(f"{pad}   ID MISMATCH: the next file's DataWriteGuid is not parent_linkage "
              f"{layer.parent_linkage}")
    elif layer.linkage == "cycle":
        print(f"{pad}   CYCLE: the chain refers back to one of its own files")


def cmd_snapshot(args: argparse.Namespace) -> int:
    """``vhdx snapshot DISK``: a Hyper-V style checkpoint child beside the disk."""
    from ..ops.create import snapshot
    bs = parse_size(args.block_size) if args.block_size else None
    path = snapshot(args.disk, block_size=bs)
    if args.json:
        emit_json(dict(disk=args.disk, checkpoint=path))
    else:
        print(f"created checkpoint {path}")
        print("write to the checkpoint from now on; the disk below it must stay unchanged")
    return EXIT_OK


def cmd_reparent(args: argparse.Namespace) -> int:
    """``vhdx reparent CHILD --parent NEW``: point a child at another parent file."""
    from ..ops.reparent import reparent
    result = reparent(args.child, args.parent, ignore_id_mismatch=args.ignore_id_mismatch)
    if args.json:
        emit_json(result)
    else:
        print(f"{args.child}: parent is now {args.parent}"
              + (" (linkage rewritten to the new parent's DataWriteGuid)" if result["linkage_changed"] else ""))
    return EXIT_OK


def _merge_command(chain_nodes: list[Node]) -> str:
    leaf, base = chain_nodes[0], chain_nodes[-1]
    if len(chain_nodes) == 2:
        return f"vhdx merge {shlex.quote(leaf.path)}"
    return f"vhdx merge {shlex.quote(leaf.path)} --into {shlex.quote(base.path)}"


def mergeable_chains(forest: Forest) -> list[list[Node]]:
    """Chains leaf..base that can be merged without touching anything else: no branch, no broken
    link, no file in use by another process."""
    out = []
    for leaf in forest.leaves:
        nodes = forest.chain_of(leaf.path)
        if len(nodes) < 2 or nodes[-1].state != "base":
            continue
        if any(n.state not in ("ok", "base") or n.in_use for n in nodes):
            continue
        if any(len(n.children) > 1 for n in nodes[1:]):
            continue
        out.append(nodes)
    return out


def _node_tags(forest: Forest, node: Node) -> list[str]:
    tags = [node.disk_type]
    if node.state == "external":
        tags.append(f"parent outside this folder: {node.external_parent}")
    if node.state in ("missing", "mismatch"):
        tags.append("PARENT MISSING" if node.state == "missing"
                    else "ID MISMATCH with " + os.path.relpath(node.parent or "", forest.folder))
    if len(node.children) > 1:
        tags.append(f"branch: {len(node.children)} children")
    if not node.children:
        tags.append("leaf")
    if node.interrupted_merge:
        tags.append("INTERRUPTED MERGE")
    if node.in_use:
        tags.append("IN USE by another process")
    return tags


def print_forest(forest: Forest) -> None:
    """Each tree from its root down (without recursion: chains may be a thousand deep), then the
    disks that no root leads to (their parents form a loop) and the unreadable files."""
    rel = lambda p: os.path.relpath(p, forest.folder)  # noqa: E731
    shown: set[str] = set()
    stack = [(root, 0) for root in sorted(forest.roots, key=lambda n: n.path, reverse=True)]
    while stack:
        node, depth = stack.pop()
        if node.path in shown:
            continue
        shown.add(node.path)
        print(f"{indent(depth, '    ')}{'└── ' if depth else ''}{rel(node.path)}  "
              f"[{', '.join(_node_tags(forest, node))}]")
        stack += [(forest.nodes[c], depth + 1) for c in sorted(node.children, reverse=True)]
    for n in sorted(forest.nodes.values(), key=lambda n: n.path):
        if n.path not in shown and n.state != "unreadable":
            print(f"{rel(n.path)}  [{n.disk_type}, in a loop of parents: no base]")
    for n in forest.unreadable:
        print(f"{rel(n.path)}  [unreadable: {n.error}]")


def cmd_orphans(args: argparse.Namespace) -> int:
    """``vhdx orphans FOLDER``: every chain of a folder, the merge commands, and with --merge the merges."""
    from ..ops.orphans import find_chains
    forest = find_chains(args.folder, recursive=args.recursive)
    plans = mergeable_chains(forest)
    if args.json and not args.merge:
        d = forest.to_dict()
        d["merge_commands"] = [_merge_command(c) for c in plans]
        emit_json(d)
        return EXIT_OK
    print_forest(forest)
    if not forest.nodes:
        print(f"no .vhdx or .avhdx files in {forest.folder}")
    if plans:
        print("\nto merge each complete chain into its base:")
        for c in plans:
            print(f"  {_merge_command(c)}")
    if args.merge:
        return merge_plans(args, plans)
    return EXIT_OK
