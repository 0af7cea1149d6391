"""``bias-lens evaluate``: score a model on a bias benchmark (or all of them) and print the metrics.

``--json`` prints ``{"suite", "split", "n", "metrics"}`` (for ``--suite all``: a list of those,
one per suite); metric keys are lower snake case. NaN metrics (e.g. a CrowS direction absent from
a ``--limit`` subset) are printed as ``null``. Every argument is validated before the model is
loaded, so bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import UsageError, add_json_arg, add_model_arg, model_from_args

AXIS_SUITES = ("stereoset", "stereoset-intra", "stereoset-inter", "crows-pairs")
SENTENCE_SUITES = ("stereoset", "stereoset-intra", "stereoset-inter", "crows-pairs", "winobias")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command (bias / retention metrics of one suite or all of them)."""
    from ..benchmarks import ALL_SUITES

    p = sub.add_parser("evaluate", help="measure bias / retention metrics on a benchmark suite")
    p.add_argument("--suite", required=True, metavar="NAME",
                   help=f"one of {', '.join(ALL_SUITES)}, or all (the bias suites and religion)")
    p.add_argument("--split", default="test", help="train, dev or test (default: test); with --suite all, "
                   "suites lacking the split use test; stereoset also has BiasEdit's robustness splits "
                   "reverse (gender) and synonym (gender, race, religion)")
    add_model_arg(p)
    p.add_argument("--limit", type=int, default=None, help="score a fixed-seed subset of N samples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--targets", default=None,
                   help="comma-separated targets for the profession suites, male first (default he,she), "
                   "or for religion (default the five religion words)")
    p.add_argument("--axis", default="gender", help="bias type for stereoset (dev split) and crows-pairs, e.g. religion")
    p.add_argument("--seed", type=int, default=0, help="split seed of the generated suites (default 0)")
    p.add_argument("--sentence-score", default=None, choices=("mean", "geomean", "mean_prob", "sum"),
                   help="sentence score of the sentence suites: mean token log-prob (StereoSet default), geomean "
                   "(official StereoSet code), mean_prob (BiasEdit), sum (CrowS/WinoBias default)")
    p.add_argument("--multi-token", action="store_true",
                   help="allow targets of several tokens (scored by their teacher-forced sequence probability)")
    p.add_argument("--limit-per-subject", type=int, default=None, help="mmlu: first N questions of each subject")
    p.add_argument("--shots", type=int, default=None, help="mmlu: 0-5 dev examples as shots (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="gsm8k/humaneval: generation cap")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="humaneval: run the generated code's tests in a subprocess (refused without this flag)")
    p.add_argument("--details", default=None, metavar="PATH", help="write one JSON line per sample to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_arg(p)
    p.set_defaults(func=run)


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(suite, split) pairs to run; raises UsageError on any bad argument (before loading a model)."""
    from ..benchmarks import ALL_SUITES, EVALUATE_ALL, splits_of
    from ..benchmarks.datasets import check_suite

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.suite == "all":
        if args.split not in ("train", "dev", "test"):
            raise UsageError(f"--split must be train, dev or test, got {args.split!r}")
        plan = []
        for s in EVALUATE_ALL:
            axis = args.axis if s in AXIS_SUITES else "gender"
            try:
                check_suite(s, None, axis)
            except ValueError as err:
                raise UsageError(f"--suite all --axis {args.axis}: {err}") from None
            valid = splits_of(s, axis)
            plan.append((s, args.split if args.split in valid else "test" if "test" in valid else valid[0]))
    elif args.suite not in ALL_SUITES:
        raise UsageError(f"unknown suite {args.suite!r}; choose one of {', '.join(ALL_SUITES)}, or all")
    else:
        try:
            check_suite(args.suite, args.split, args.axis if args.suite in AXIS_SUITES else "gender")
        except ValueError as err:
            raise UsageError(str(err)) from None
        if args.axis != "gender" and args.suite not in AXIS_SUITES:
            raise UsageError(f"--axis applies to {' and '.join(AXIS_SUITES)} only, not {args.suite!r}")
        plan = [(args.suite, args.split)]
    _check_targets(args)
    _check_suite_options(args)
    if args.details:
        folder = os.path.dirname(os.path.abspath(args.details))
        if not os.path.isdir(folder):
            raise UsageError(f"--details folder {folder} does not exist; create it or choose another path")
        if os.path.isdir(args.details):
            raise UsageError(f"--details {args.details} is a folder; pass a file path")
    return plan


def _check_targets(args: argparse.Namespace) -> None:
    from ..benchmarks.runners import PROFESSION_SUITES  # lazy: --help must not import torch
    from ..targets import parse_words

    if args.targets is None:
        return
    words = parse_words(args.targets)
    if args.suite not in (*PROFESSION_SUITES, "religion"):
        raise UsageError("--targets applies to one profession suite or religion; drop it or pick such a suite")
    if args.suite in PROFESSION_SUITES and len(words) != 2:
        raise UsageError(f"suite {args.suite!r} compares a male and a female target; pass two words, e.g. he,she")
    if len(set(words)) != len(words):
        raise UsageError(f"--targets {args.targets} repeats a word; pass distinct words, e.g. he,she")


def _capability_kwargs(args: argparse.Namespace) -> dict:
    """The capability-suite options the user set (only those: each suite takes its own)."""
    out = {"limit_per_subject": args.limit_per_subject, "shots": args.shots, "max_new_tokens": args.max_new_tokens,
           "allow_code_execution": args.allow_code_execution or None}
    return {k: v for k, v in out.items() if v is not None}


def _check_suite_options(args: argparse.Namespace) -> None:
    from ..benchmarks import CAPABILITY_SUITES

    if args.limit_per_subject is not None and args.limit_per_subject < 1:
        raise UsageError(f"--limit-per-subject must be >= 1, got {args.limit_per_subject}")
    if args.shots is not None and not 0 <= args.shots <= 5:
        raise UsageError(f"--shots must be 0..5 (MMLU has 5 dev examples per subject), got {args.shots}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if _capability_kwargs(args) and args.suite not in CAPABILITY_SUITES:
        raise UsageError(f"--limit-per-subject/--shots/--max-new-tokens/--allow-code-execution apply to "
                         f"{', '.join(CAPABILITY_SUITES)}, not {args.suite!r}")
    if args.suite == "humaneval" and not args.allow_code_execution:
        raise UsageError("humaneval runs model-written code; pass --allow-code-execution to run it (in a subprocess "
                         "with a timeout, in a temporary folder)")
    if args.sentence_score is not None and args.suite not in (*SENTENCE_SUITES, "all"):
        raise UsageError(f"--sentence-score applies to {', '.join(SENTENCE_SUITES)}, not {args.suite!r}")


def _clean(x):
    """NaN/inf -> None so that the output is valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _details_bytes(results: list) -> bytes:
    lines = [json.dumps(_clean({"suite": r.suite, "split": r.split, **d}), ensure_ascii=False)
             for r in results for d in r.details]
    return ("\n".join(lines) + "\n").encode("utf-8")


def run(args: argparse.Namespace) -> int:
    """Evaluate the model on the requested suites and print (or write) the metrics; returns the exit status."""
    plan = _plan(args)
    from ..benchmarks import evaluate
    from ..benchmarks.runners import PROFESSION_SUITES
    from ..io import atomic_write_bytes
    from ..targets import parse_words

    targets = parse_words(args.targets) if args.targets else None
    lm = model_from_args(args)
    results = []
    for suite, split in plan:
        extra = _capability_kwargs(args) if len(plan) == 1 else {}
        if suite in SENTENCE_SUITES and args.sentence_score:
            extra["sentence_score"] = args.sentence_score
        results.append(evaluate(
            lm, suite, split, limit=args.limit, batch_size=args.batch_size,
            targets=targets if suite in (*PROFESSION_SUITES, "religion") else None,
            progress=not args.no_progress, axis=args.axis if suite in AXIS_SUITES else "gender", seed=args.seed,
            multi_token=args.multi_token, **extra,
        ))
    if args.details:
        atomic_write_bytes(args.details, _details_bytes(results))
    if args.json:
        out = results[0].to_dict() if args.suite != "all" else [r.to_dict() for r in results]
        json.dump(_clean(out), sys.stdout)
        sys.stdout.write("\n")
    else:
        for r in results:
            print(f"{r.suite} [{r.split}] n={r.n}")
            for k, v in r.metrics.items():
                print(f"  {k:<24} {v:.4f}")
    return 0
