"""``bias-lens evaluate``: score a model on a bias benchmark (or all of them) and print the metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from . import UsageError, add_json_arg, add_model_arg


def register(sub: argparse._SubParsersAction) -> None:
    from ..benchmarks import ALL_SUITES

    p = sub.add_parser("evaluate", help="measure bias / retention metrics on a benchmark suite")
    p.add_argument("--suite", required=True, choices=[*ALL_SUITES, "all"], metavar="NAME",
                   help=f"one of {', '.join(ALL_SUITES)}, or all")
    p.add_argument("--split", default="test", help="train, dev or test (default: test; suites without it fail)")
    add_model_arg(p)
    p.add_argument("--limit", type=int, default=None, help="score a fixed-seed subset of N samples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--targets", default=None, help="comma-separated targets, male first (profession suites)")
    p.add_argument("--axis", default="gender", help="bias type for stereoset (dev) and crows-pairs, e.g. religion")
    p.add_argument("--seed", type=int, default=0, help="split seed of the generated suites (default 0)")
    p.add_argument("--details", default=None, metavar="PATH", help="write one JSON line per sample to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_arg(p)
    p.set_defaults(func=run)


def _write_details(path: str, results: list) -> None:
    """Atomic JSON-lines write (tmp file in the same folder, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--details folder {folder} does not exist; create it or choose another path")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".details-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for r in results:
                for d in r.details:
                    fh.write(json.dumps({"suite": r.suite, "split": r.split, **d}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    from ..benchmarks import SUITES, splits_of
    from ..benchmarks.datasets import check_suite

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.suite != "all":
        check_suite(args.suite, args.split, args.axis)
        return [(args.suite, args.split)]
    plan = [(s, args.split if args.split in splits_of(s) else "test") for s in SUITES]
    return plan


def run(args: argparse.Namespace) -> int:
    from ..targets import parse_words

    plan = _plan(args)
    targets = parse_words(args.targets) if args.targets else None
    from ..benchmarks import evaluate
    from ..lens import load_model

    lm = load_model(args.model)
    results = []
    for suite, split in plan:
        axis = args.axis if suite in ("stereoset", "crows-pairs") else "gender"
        results.append(evaluate(lm, suite, split, limit=args.limit, batch_size=args.batch_size,
                                targets=targets if suite not in ("stereoset", "crows-pairs", "winogender",
                                                                 "winobias", "retention") else None,
                                progress=not args.no_progress, axis=axis, seed=args.seed))
    if args.details:
        _write_details(args.details, results)
    if args.json:
        out = results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results]
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        for r in results:
            print(f"{r.suite} [{r.split}] n={r.n}")
            for k, v in r.metrics.items():
                print(f"  {k:<24} {v:.4f}")
    return 0
