"""The merge verb, and the merging half of ``vhdx orphans --merge``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from .common import EXIT_ERROR, EXIT_OK, about, add_progress_options, emit_json
from .progress import Progress, human_bytes

if TYPE_CHECKING:
    from ..ops.merge.plan import MergePlan


def register(sub: Any) -> None:
    """Add the ``merge`` verb and its options to the command line."""
    p = sub.add_parser("merge", help="merge a checkpoint (or several levels) into its parent, like Merge-VHD",
                       **about("Fold a checkpoint into its parent, or every layer down to --into ANCESTOR, as "
                               "Merge-VHD does: afterwards the destination reads exactly as CHILD did, and the "
                               "merged files (CHILD and the layers between) are deleted, unless --keep. Other "
                               "disks that depend on the destination make it refuse, unless --force. A merge "
                               "that was interrupted is finished by running the same command again.",
                               "vhdx merge disk_<GUID>.avhdx",
                               "vhdx merge --dry-run --into disk.vhdx newest.avhdx"))
    p.add_argument("child", help="the checkpoint to merge (the newest layer to fold in)")
    p.add_argument("--into", metavar="ANCESTOR", help="merge every layer down to this ancestor (default: the parent)")
    p.add_argument("--keep", action="store_true", help="keep the merged files (they are no longer valid)")
    p.add_argument("--force", action="store_true", help="merge even though other disks depend on the destination")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--ignore-id-mismatch", action="store_true",
                   help="accept a parent whose DataWriteGuid differs from the child's parent_linkage")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent disks in DIR (repeatable)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_progress_options(p)
    p.set_defaults(func=cmd_merge)


def print_plan(plan: MergePlan) -> None:
    """Print what a merge will do: sources, destination, bytes, space, deletes, dependents."""
    print(f"merge plan{' (resuming an interrupted merge)' if plan.resuming else ''}:")
    for s in plan.sources:
        print(f"  from        {s}  ({human_bytes(plan.per_source_bytes.get(s, 0))} of data)")
    print(f"  into        {plan.destination}  [{plan.destination_type}]")
    print(f"  copy        {human_bytes(plan.bytes_to_copy)} ({plan.bytes_to_copy} bytes), zero "
          f"{human_bytes(plan.bytes_of_zeros)}, {plan.destination_blocks} destination blocks, "
          f"{plan.allocations} to allocate ({human_bytes(plan.bytes_to_allocate)})")
    if plan.bytes_needed:
        print(f"  space       needs up to {human_bytes(plan.bytes_needed)} of free space")
    for p in plan.to_delete:
        print(f"  delete      {p}")
    if plan.dependents:
        print("  WARNING: these disks depend on the destination or on a layer the merge deletes:")
        for d in plan.dependents:
            print(f"    {d}")


def _announce(args: argparse.Namespace) -> Any:
    """Print every file the merge will delete, before it starts (not with --json)."""
    def show(plan: MergePlan) -> None:
        if not getattr(args, "json", False):
            for p in plan.to_delete:
                print(f"will delete {p}", flush=True)
    return show


def _run_one(args: argparse.Namespace, child: str, into: str | None) -> dict[str, Any]:
    from ..ops.merge.run import merge
    progress = Progress(f"merge {os.path.basename(child)}", enabled=getattr(args, "progress", None))
    result = merge(child, into, progress=progress, ignore_id_mismatch=getattr(args, "ignore_id_mismatch", False),
                   keep=getattr(args, "keep", False), force=getattr(args, "force", False),
                   search_paths=getattr(args, "search", []), on_plan=_announce(args))
    progress.finish()
    d = result.to_dict()
    return d


def cmd_merge(args: argparse.Namespace) -> int:
    """``vhdx merge``: print the plan (``--dry-run``) or merge and print what was done."""
    from ..ops.merge.run import merge
    if args.dry_run:
        plan = merge(args.child, args.into, ignore_id_mismatch=args.ignore_id_mismatch, search_paths=args.search,
                     keep=args.keep, dry_run=True)
        if args.json:
            emit_json(plan.to_dict())
        else:
            print_plan(plan)
            print("dry run: nothing was written")
        return EXIT_OK
    d = _run_one(args, args.child, args.into)
    if args.json:
        emit_json(dict(child=args.child, destination=d["plan"]["destination"], bytes_copied=d["bytes_copied"],
                       bytes_cloned=d["bytes_cloned"], bytes_written=d["bytes_copied"] - d["bytes_cloned"],
                       blocks=d["plan"]["destination_blocks"], seconds=d["seconds"],
                       throughput_mib_s=d["throughput_mib_s"], to_delete=d["plan"]["to_delete"], deleted=d["deleted"],
                       broken_dependents=d["broken_dependents"], new_data_write_guid=d["new_data_write_guid"]))
    elif d["plan"]["resuming"] and not d["bytes_copied"]:
        print(f"finished an interrupted merge into {d['plan']['destination']}: its data had already been copied")
        for p in d["deleted"]:
            print(f"  deleted {p}")
    else:
        print(f"merged {human_bytes(d['bytes_copied'])} into {d['plan']['destination']} in {d['seconds']:.2f} s "
              f"({d['throughput_mib_s']:.0f} MiB/s)")
        if d["bytes_cloned"]:
            print(f"  cloned {human_bytes(d['bytes_cloned'])} (extents shared with the merged files, no data "
                  f"moved), copied {human_bytes(d['bytes_copied'] - d['bytes_cloned'])}")
        for p in d["deleted"]:
            print(f"  deleted {p}")
        for p in d["broken_dependents"]:
            print(f"  WARNING: {p} depended on a merged disk and no longer matches its parent")
    return EXIT_OK


def merge_plans(args: argparse.Namespace, chains_to_merge: list) -> int:
    """Merge each unambiguous chain of ``vhdx orphans --merge`` after showing its plan."""
    from ..ops.merge.run import merge
    if not chains_to_merge:
        print("nothing to merge: no complete, unbranched chain of checkpoints")
        return EXIT_OK
    plans = []
    for nodes in chains_to_merge:
        leaf, base = nodes[0].path, nodes[-1].path
        plan = merge(leaf, base, dry_run=True)
        plans.append((leaf, base, plan))
        if not args.json:
            print()
            print_plan(plan)
    if not args.yes:
        if not sys.stdin.isatty():
            print("refusing to merge without confirmation: pass --yes", file=sys.stderr)
            return EXIT_ERROR
        answer = input(f"merge these {len(plans)} chains? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing merged")
            return EXIT_OK
    results = []
    for leaf, base, _plan in plans:
        results.append(_run_one(args, leaf, base))
        if not args.json:
            print(f"merged {leaf} into {base}")
    if args.json:
        emit_json(dict(merged=results))
    return EXIT_OK
