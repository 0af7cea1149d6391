"""``bias-lens datasets``: list the benchmark suites with their split sizes (or export one split)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import UsageError, add_json_arg


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``datasets`` command (list suites and split sizes, or export one split as JSONL)."""
    p = sub.add_parser("datasets", help="list benchmark suites and split sizes; --export writes a split as JSONL")
    p.add_argument("--seed", type=int, default=0, help="split seed of the generated suites (default 0)")
    p.add_argument("--export", nargs=2, metavar=("SUITE", "SPLIT"), help="write this split's samples as JSON lines")
    p.add_argument("--out", default=None, help="file for --export (default: stdout)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the suites and split sizes, or write ``--export SUITE SPLIT`` as JSON lines; returns the exit status."""
    from ..benchmarks import ALL_SUITES, load_split, split_sizes, to_jsonl
    from ..io import atomic_write_bytes

    if args.out is not None and not args.export:
        raise UsageError("--out needs --export SUITE SPLIT")
    if args.export:
        suite, split = args.export
        if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise UsageError(f"--out folder {os.path.dirname(os.path.abspath(args.out))} does not exist")
        data = to_jsonl(load_split(suite, split, seed=args.seed))
        if args.out is None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            atomic_write_bytes(args.out, data)
        return 0
    sizes = {s: split_sizes(s, seed=args.seed) for s in ALL_SUITES}
    if args.json:
        json.dump(sizes, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for s, sz in sizes.items():
        print(f"{s:<15} " + "  ".join(f"{k}={v}" for k, v in sz.items()))
    return 0
