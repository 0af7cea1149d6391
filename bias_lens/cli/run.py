"""``bias-lens run``: the main job — evaluate -> locate -> edit -> export -> figures and report.

``--quick`` runs a few-minute version (fewer samples and edit rows, capped fine-tuning);
results are cached by model + config hash, so a re-run or an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import UsageError, add_json_arg, add_model_arg, model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` command (the main job: evaluate, locate, edit, export, report)."""
    p = sub.add_parser("run", help="the main job: evaluate, locate, edit, export, report")
    add_model_arg(p)
    p.add_argument("--quick", action="store_true", help="a few-minute run (fewer samples and edit rows)")
    p.add_argument("--out", default=None, help="output folder (default: a fresh runs/<timestamp>)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-cache", action="store_true", help="recompute every stage (and store nothing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the full or ``--quick`` run configuration and run the pipeline into ``--out``; returns the exit status."""
    import torch

    from ..loading import resolve_dtype
    from ..pipeline import RunConfig, run_pipeline
    from ..pipeline.runner import check_out

    cfg = RunConfig.quick_preset(model=args.model) if args.quick else RunConfig.full(model=args.model)
    half = resolve_dtype(args.dtype) != torch.float32
    if half and not args.no_cache:
        raise UsageError(f"--dtype {args.dtype} needs --no-cache: the stage cache is keyed on the weight files, "
                         "not their dtype, so it would mix float32 and half-precision results")
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            check_out(out, args.force)
        except FileExistsError as err:
            raise UsageError(str(err)) from None
    placed = args.device is not None or args.device_map is not None
    # float32 on the default device: the pipeline loads the model itself, as before
    lm = model_from_args(args) if half or placed else None
    command = "bias-lens " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "bias-lens run"
    path = run_pipeline(cfg, out, force=args.force, use_cache=not args.no_cache, progress=not args.no_progress,
                        command=command, lm=lm)
    summary = json.loads((path / "results.json").read_text())
    if args.json:
        json.dump({"out": str(path), "best": summary["best"], "org": summary["org"],
                   "rows": {r["name"]: r["metrics"] | {"cost_p": r["cost_p"]} for r in summary["rows"]}},
                  sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"report: {path / 'report.md'}")
        print((path / "report.md").read_text().split("## Editing", 1)[-1].split("## Figures", 1)[0])
    return 0
