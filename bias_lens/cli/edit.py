"""``bias-lens edit``: locate, edit only the located weights, measure before/after, export.

Thin wrapper over :func:`bias_lens.edit.pipeline.run_edit`; the export is
:func:`~bias_lens.edit.export.export_checkpoint` (verified by reloading) into ``--out`` plus the
edit as a sparse patch in ``--out/patch`` (``bias-lens patch apply`` reproduces the checkpoint
from the base). Every option is validated before the model is loaded, and ``--out`` must be new
or empty, so bad input changes no weights and no files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import UsageError, add_json_arg, add_model_arg

PATCH_DIR = "patch"


def register(sub: argparse._SubParsersAction) -> None:
    from ..edit.contrastive import MODES
    from ..edit.losses import LOSSES
    from ..edit.pipeline import METHODS, PROFESSION_SUITES, SCALES

    p = sub.add_parser("edit", help="edit the located weights (masked fine-tuning, masking, contrastive, baselines)")
    p.add_argument("--scale", choices=SCALES, default=None, help="what to locate and edit (not needed for fpft/prompt)")
    p.add_argument("--method", choices=METHODS, required=True)
    add_model_arg(p)
    p.add_argument("--suite", default="genbiaseval", choices=PROFESSION_SUITES)
    p.add_argument("--locate-json", default=None, metavar="FILE", help="a saved locate result (skips locating)")
    p.add_argument("--out", default=None, metavar="DIR", help="export the edited checkpoint (+ patch/) here")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--k", type=int, default=None, help="located labels to edit (default per scale: layer 1, module 1, "
                   "row 4, neuron 4096 entries, attribution 8 neurons)")
    p.add_argument("--n-samples", type=int, default=256, help="train samples to locate and fine-tune on (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=list(LOSSES), default=None,
                   help="fine-tuning loss (default: msme_literal for msme/fpft, msme_align for the contrastive reference, lftf for lftf)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: finetune.SCALE_LR of the scale)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="steps between dev/retention checks (default: per epoch)")
    p.add_argument("--patience", type=int, default=2, help="dev checks without improvement before stopping")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dev-limit", type=int, default=128, help="dev samples for early stopping (default 128)")
    p.add_argument("--limit", type=int, default=None, help="test samples scored before/after (default: all)")
    p.add_argument("--ub-limit", type=int, default=None, help="GenHintEval samples for UB (default: --limit)")
    p.add_argument("--retention-limit", type=int, default=48, help="retention sentences (guard and metrics)")
    p.add_argument("--retention-threshold", type=float, default=0.05, help="max relative perplexity rise in training")
    p.add_argument("--neuron-params", choices=("all", "down"), default="all",
                   help="attribution scale: train down column + gate/up rows (all) or down columns only")
    p.add_argument("--no-general-filter", action="store_true", help="attribution scale: keep general neurons")
    p.add_argument("--drop", choices=("attention", "mlp"), default=None, help="LFTF ablation: w/o attention or MLP")
    p.add_argument("--mask-scale", type=float, default=0.0, help="--method mask: factor for the masked entries")
    p.add_argument("--contrastive-mode", choices=[m for m in MODES if m != "mask_switch"], default="interpolate")
    p.add_argument("--alpha", type=float, default=1.0, help="contrastive interpolation/extrapolation factor")
    p.add_argument("--contrastive-k", type=int, default=5000, help="contrastive: entries with largest |ref - model|")
    p.add_argument("--hint-anchor", action="store_true",
                   help="msme/lftf: keep UB-Score by an anchor on GenHintEval train prompts (docs/edit_hint.md)")
    p.add_argument("--hint-weight", type=float, default=1.0, help="--hint-anchor: weight of the anchor term")
    p.add_argument("--hint-loss", choices=["ub_drop", "hinted_drop", "ub_l2"], default="ub_drop",
                   help="--hint-anchor: anchor term (docs/edit_hint.md; neuron scale measured best with hinted_drop)")
    p.add_argument("--ub-tolerance", type=float, default=0.05,
                   help="--hint-anchor: early stopping rejects states whose dev UB fell more than this")
    add_json_arg(p)
    p.set_defaults(func=run)


def _plan(args: argparse.Namespace):
    from ..edit.pipeline import EditPlan

    try:
        return EditPlan(
            method=args.method, scale=args.scale, suite=args.suite, n_samples=args.n_samples, seed=args.seed, k=args.k,
            loss=args.loss, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            eval_every=args.eval_every, patience=args.patience,
            dev_limit=args.dev_limit, retention_limit=args.retention_limit,
            retention_threshold=args.retention_threshold, limit=args.limit, ub_limit=args.ub_limit,
            neuron_params=args.neuron_params, general_filter=not args.no_general_filter, drop=args.drop,
            mask_scale=args.mask_scale, contrastive_mode=args.contrastive_mode, alpha=args.alpha,
            contrastive_k=args.contrastive_k, hint_anchor=args.hint_anchor, hint_weight=args.hint_weight,
            hint_loss=args.hint_loss, ub_tolerance=args.ub_tolerance,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


def _check_inputs(args: argparse.Namespace, plan):
    """Validate files before any model is loaded; returns the locate result (or None)."""
    result = None
    if args.locate_json is not None:
        if plan.method in ("fpft", "prompt"):
            raise UsageError(f"--method {plan.method} edits no located weights; drop --locate-json")
        path = Path(args.locate_json)
        if not path.is_file():
            raise UsageError(f"--locate-json {path} does not exist; save one with LocateResult.save or `bias-lens run --json`")
        from ..locate.result import LocateResult

        try:
            result = LocateResult.load(path)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise UsageError(f"--locate-json {path} is not a locate result: {err}") from err
        if not result.labels:
            raise UsageError(f"--locate-json {path} has no labels")
    if args.out is not None:
        if plan.method == "prompt":
            raise UsageError("--method prompt edits no weights, so there is nothing to export; drop --out")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            raise UsageError(f"--out {out} exists and is not empty; choose another folder or pass --force")
    return result


def _export(lm, run, args) -> str:
    from ..edit.export import base_folder, export_checkpoint
    from ..edit.patch import save_patch, weights_sha256

    out = Path(args.out)
    base = base_folder(lm)
    export_checkpoint(lm, out, method=run.edit.method, base_name=lm.name, hyperparams=run.info.get("config", {}),
                      seed=run.plan.seed, metrics_before=run.before, metrics_after=run.after, force=args.force,
                      extra={"scale": run.plan.scale, "plan": run.plan.to_dict(), "locate": run.locate,
                             "mask_size": run.mask_size, "n_params_edited": run.n_changed})
    try:
        save_patch(run.edit, out / PATCH_DIR, originals=run.handle.originals, base_name=lm.name,
                   base_sha256=weights_sha256(base) if base else None)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # the checkpoint was just created by us: leave nothing half-done
        raise
    return str(out)


#: exit status of an edit that changed no weights (a guard rolled it back, or the mask was empty)
EXIT_UNCHANGED = 3


def unchanged_reason(run) -> str | None:
    """``None`` when the edit changed weights; else one line naming the guard and its numbers."""
    if run.n_changed > 0:
        return None
    status = run.info.get("status") or "done"
    hist = run.info.get("history") or []
    if status == "retention_rollback" and len(hist) > 1 and hist[-1].get("retention_ppl") is not None:
        base, last = hist[0]["retention_ppl"], hist[-1]["retention_ppl"]
        thr = (run.info.get("config") or {}).get("retention_threshold")
        return (f"the retention guard rolled the edit back at step {hist[-1].get('step')} (perplexity {last:.2f} > "
                f"{base:.2f} x (1 + {thr})) before any accepted step, so 0 weights changed")
    if status == "early_stopped" and hist:
        return (f"early stopping kept step 0: no step lowered dev bias below {hist[0].get('dev_afgb', float('nan')):.4f}, "
                "so 0 weights changed")
    return f"the edit changed 0 weights (fine-tuning status {status})"


def run(args: argparse.Namespace) -> int:
    from ..edit.pipeline import run_edit
    from ..lens import load_model

    plan = _plan(args)
    result = _check_inputs(args, plan)
    lm = load_model(args.model)
    try:
        edit_run = run_edit(lm, plan, result)
    except RuntimeError as err:
        raise UsageError(str(err)) from err
    failed = unchanged_reason(edit_run) if plan.method != "prompt" else None
    try:
        out = _export(lm, edit_run, args) if args.out and edit_run.edit is not None and not failed else None
    finally:
        if edit_run.handle is not None:
            edit_run.handle.undo()
    payload = {"method": plan.method, "scale": plan.scale, "n_params_edited": edit_run.n_changed,
               "mask_size": edit_run.mask_size, "before": edit_run.before, "after": edit_run.after, "out": out,
               "status": "unchanged" if failed else edit_run.info.get("status"),
               "finetune_status": edit_run.info.get("status"), "reason": failed,
               "locate": edit_run.locate.get("labels", [])[:20]}
    if args.json:
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"edit {plan.method} at scale {plan.scale}: {edit_run.n_changed} weights changed (Cost-P {edit_run.mask_size})")
        for k in edit_run.before:
            print(f"  {k:<16} {edit_run.before[k]:>10.4f} -> {edit_run.after[k]:.4f}")
        if out:
            print(f"exported to {out} (patch in {Path(out) / PATCH_DIR})")
    if failed:
        print(f"bias-lens edit: failed: {failed}; nothing exported", file=sys.stderr)
        return EXIT_UNCHANGED
    return 0
