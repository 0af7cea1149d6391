"""``bias-lens edit``: locate, edit only the located weights, measure before/after, export.

Builds one :class:`~bias_lens.pipeline.plan.EditPlan` from the flags (each method's defaults are
its variant's in :mod:`bias_lens.edit.methods`; a flag left out keeps them) and runs it through
:func:`bias_lens.pipeline.driver.apply_plan`, the driver of ``bias-lens run``'s rows too; the export is
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
from typing import TYPE_CHECKING

from . import UsageError, add_json_arg, add_model_arg, model_from_args

if TYPE_CHECKING:
    from ..pipeline.driver import EditRecord

PATCH_DIR = "patch"
EDITOR_DIR = "editor"  # --method editor: the trained editors (editor.json + editor.safetensors)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``edit`` command and its flags (every flag left out keeps the method variant's default)."""
    from ..edit.contrastive import MODES
    from ..edit.guards import DEV_METRICS
    from ..edit.losses import HINT_LOSSES, LOSSES
    from ..pipeline.plan import PROFESSION_SUITES, SCALES

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
    p.add_argument("--pick", choices=("top", "middle", "lowest", "random"), default="top",
                   help="top (default: the located edit) or a control: the same-size edit from the middle of the "
                   "ranking, at its lowest-ranked or at random (--seed) places (blocks, modules, rows or entries)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="train samples to edit from (default: the whole train split for the closed-form solves, "
                   "256 otherwise); located on at most 256 of them")
    p.add_argument("--seed", type=int, default=0)
    _add_training_args(p, LOSSES, DEV_METRICS)
    _add_method_args(p, MODES, HINT_LOSSES)
    add_json_arg(p)
    p.set_defaults(func=run)


def _add_training_args(p: argparse.ArgumentParser, losses: dict, dev_metrics: tuple[str, ...]) -> None:
    """Fine-tuning and measurement flags (None = the method variant's default)."""
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="--method msme: closed-form (default: MSME's stated target, equal and non-zero he/she, solved "
                   "in closed form on the linearised model with the hinted prompts kept; docs/equalise.md) or finetune "
                   "(the paper's masked fine-tuning with its literal loss, --loss msme_literal)")
    p.add_argument("--loss", choices=list(losses), default=None,
                   help="fine-tuning loss (default: msme_literal for msme/fpft, lftf for lftf)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: finetune.SCALE_LR of the scale; contrastive references: 1e-4)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 2)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="steps between dev/retention checks (default: per epoch)")
    p.add_argument("--patience", type=int, default=None, help="dev checks without improvement before stopping (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 32)")
    p.add_argument("--dev-limit", type=int, default=None, help="dev samples for early stopping (default 128)")
    p.add_argument("--dev-metric", choices=dev_metrics, default=None,
                   help="early-stopping objective: afgb (raw, the papers') or afgb_renorm (he/she shares only)")
    p.add_argument("--mass-weight", type=float, default=None, help="weight of the mass-keeping term (default 0: off)")
    p.add_argument("--mass-floor", type=float, default=None,
                   help="reject states whose dev pronoun mass fell below this fraction of the unedited one")
    p.add_argument("--limit", type=int, default=None, help="test samples scored before/after (default: all)")
    p.add_argument("--ub-limit", type=int, default=None, help="GenHintEval samples for UB (default: --limit)")
    p.add_argument("--retention-limit", type=int, default=48, help="retention sentences (guard and metrics)")
    p.add_argument("--mmlu-limit", type=int, default=None,
                   help="MMLU test questions per subject measured before/after (0 = skip; default 1, i.e. 57 questions)")
    p.add_argument("--arithmetic-limit", type=int, default=None,
                   help="arithmetic problems measured before/after (0 = skip; default 150)")
    p.add_argument("--retention-threshold", type=float, default=None,
                   help="max relative perplexity rise in training (default 0.05)")


def _add_method_args(p: argparse.ArgumentParser, modes: tuple[str, ...], hint_losses: dict) -> None:
    """Flags of one method or scale each (refused for the others)."""
    p.add_argument("--neuron-params", choices=("all", "down"), default="all",
                   help="attribution scale: train down column + gate/up rows (all) or down columns only")
    p.add_argument("--no-general-filter", action="store_true", help="attribution scale: keep general neurons")
    _add_selection_args(p)
    p.add_argument("--drop", choices=("attention", "mlp"), default=None, help="LFTF ablation: w/o attention or MLP")
    p.add_argument("--nesting", choices=("flat", "msme"), default=None,
                   help="module/row/neuron scales: flat (default: the all-layer FFN-down module scan, top --k) or msme "
                   "(MSME Eq. 2-5 nested: layer -> every matrix of it -> half its rows, all edited -> entries in them)")
    p.add_argument("--mask-scale", type=float, default=None, help="--method mask: factor for the masked entries (default 0)")
    _add_contrastive_args(p, modes)
    p.add_argument("--hint-anchor", action="store_true",
                   help="msme/lftf: keep UB-Score by an anchor on GenHintEval train prompts (docs/edit_hint.md)")
    p.add_argument("--hint-weight", type=float, default=None, help="--hint-anchor: weight of the anchor term (default 1)")
    p.add_argument("--hint-loss", choices=list(hint_losses), default=None,
                   help="--hint-anchor: anchor term (default ub_drop; docs/edit_hint.md; neuron scale measured best "
                   "with hinted_drop)")
    p.add_argument("--ub-tolerance", type=float, default=None,
                   help="--hint-anchor: early stopping rejects states whose dev UB fell more than this (default 0.05)")
    p.add_argument("--null-dim", type=int, default=None, help="--method dama: dimensions removed per layer (default d_model/32, the reference's 128 of 4096)")
    p.add_argument("--dama-layers", type=int, default=None,
                   help="--method dama: edited layers, ending 2 below the top (default 11/32 of the layers)")
    p.add_argument("--dama-update", choices=("iterative", "mixed"), default=None,
                   help="--method dama: per-layer targets (iterative, the reference default) or computed once (mixed)")
    p.add_argument("--max-requests", type=int, default=None, help="--method dama: train prompts used (default: all)")
    p.add_argument("--gamma", type=float, default=None,
                   help="closed form (--method equalise, msme): share of each train prompt's he/she log-odds to remove "
                   "(default 1)")
    p.add_argument("--ridge", type=float, default=None,
                   help="closed form: relative ridge of the solve (default 0.01 for a whole matrix, 0.3 for entries; "
                   "chosen on dev, docs/equalise.md)")
    p.add_argument("--penalty", choices=("diag", "block"), default=None,
                   help="closed form, entries: the retention metric of the ridge (default diag; block: C within each row)")
    p.add_argument("--n-iter", type=int, default=None,
                   help="closed form: re-linearisations (default 1 for a whole matrix, 3 for entries)")
    p.add_argument("--no-hint-rows", action="store_true",
                   help="closed form: do not keep the hinted GenHintEval prompts' log-odds (UB)")
    p.add_argument("--bias", choices=EDITOR_BIASES, default=None,
                   help="--method editor: the StereoSet bias type edited (default gender)")
    p.add_argument("--layers", default=None, metavar="L,L,...",
                   help="--method editor: blocks whose mlp.down the editors shift (default: the top 3)")
    p.add_argument("--editor", default=None, metavar="DIR",
                   help="--method editor: load trained editors from DIR (editor.json + editor.safetensors) instead of training")
    p.add_argument("--meta-lr", type=float, default=None, help="--method editor: the editors' Adam learning rate")
    p.add_argument("--loc-coef", type=float, default=None,
                   help="--method editor: weight of the retention loss (0 = the paper's w/o retention ablation)")
    p.add_argument("--max-minutes", type=float, default=None, help="--method editor: training wall-time cap")
    p.add_argument("--shift-scale", type=float, default=None,
                   help="--method editor: multiply the predicted shift (default 1 = the reference; docs/biasedit.md sweep)")
    p.add_argument("--editor-loss", choices=("mean_prob_kl", "pair_kl"), default=None,
                   help="--method editor: debiasing loss (default mean_prob_kl, the reference's; docs/biasedit.md)")
    p.add_argument("--retention-loss", choices=("mean_prob_kl", "token_kl"), default=None,
                   help="--method editor: retention loss (default mean_prob_kl, the reference's; token_kl = KL to the "
                   "unedited next-token distributions)")


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    """``--scale attribution`` neuron selection flags (the paper pipeline or the attribution ranking)."""
    p.add_argument("--neuron-selection", choices=("paper", "attribution"), default=None,
                   help="attribution scale: the interpretable-neuron-editing pipeline (paper: 50 FFN value + 50 attention "
                   "value + 50 FFN query candidates -> <start> filter -> causal selection of --k (50) on dev prompts; "
                   "default with --method mask) or the top --k (8) attribution FFN neurons (attribution; default otherwise)")
    p.add_argument("--causal-mode", choices=("independent", "greedy", "joint"), default=None,
                   help="--neuron-selection paper: the paper's rule (independent, default: the k best single masks), greedy, "
                   "or joint (the set whose masking together lowers the renormalised gap with the pronoun mass kept)")


def _add_contrastive_args(p: argparse.ArgumentParser, modes: tuple[str, ...]) -> None:
    """``--method contrastive`` flags (docs/contrastive.md; refused for the other methods)."""
    p.add_argument("--contrastive-mode", choices=modes, default=None,
                   help="contrastive: interpolate (default), extrapolate, prune or mask_switch")
    p.add_argument("--alpha", type=float, default=None,
                   help="contrastive: theta + alpha (r - s); interpolate 0..1 (default 1), extrapolate > 1 or < 0")
    p.add_argument("--localisation", choices=("mask_diff", "value_diff"), default=None,
                   help="contrastive: entries where the references' IMP masks differ (default) or largest |w_stereo - w_anti|")
    p.add_argument("--contrastive-k", type=int, default=None,
                   help="contrastive value_diff: entries edited (default: the mask-difference size)")
    p.add_argument("--reference-side", choices=("anti", "stereo", "neutral"), default=None,
                   help="contrastive: the reference the target moves toward for alpha > 0 (default anti)")
    p.add_argument("--no-transfer", action="store_true",
                   help="contrastive: move toward the reference's values (theta + alpha (r - theta)) instead of "
                   "adding the stereo -> anti update (theta + alpha (r - s))")
    p.add_argument("--random-control", action="store_true",
                   help="contrastive: edit as many random entries per matrix instead of the located ones (the control)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="contrastive: load trained references from DIR (references.json + <side>.safetensors) instead of training")
    p.add_argument("--reference-steps", type=int, default=None, help="contrastive: reference fine-tuning steps (default 96)")
    p.add_argument("--imp-rounds", type=int, default=None, help="contrastive: iterative magnitude pruning rounds (default 2)")
    p.add_argument("--prune-rate", type=float, default=None, help="contrastive: share of remaining weights pruned per round (default 0.2)")
    p.add_argument("--retrain-steps", type=int, default=None, help="contrastive: retraining steps per IMP round (default 64)")


METHODS = ("msme", "lftf", "mask", "contrastive", "fpft", "prompt", "dama", "equalise", "editor")
MASKLESS_METHODS = ("fpft", "prompt", "dama", "editor", "contrastive")  # = edit.methods.MASKLESS (not imported: --help loads no torch)
EDITOR_BIASES = ("gender", "race", "religion")  # = edit.methods.EDITOR_BIASES (not imported: --help loads no torch)
#: --method editor flags -> EditorMethod fields (``--batch-size`` is the paper's batch size: requests per shift)
EDITOR_FLAGS = {"bias": "bias", "editor": "editor_dir", "meta_lr": "meta_lr", "loc_coef": "loc_coef",
                "max_minutes": "max_minutes", "lr": "lr", "epochs": "epochs", "batch_size": "n_edits",
                "editor_loss": "loss", "retention_loss": "retention", "shift_scale": "shift_scale"}
#: --method editor flags that configure training (refused with a loaded --editor)
EDITOR_TRAINING = ("layers", "meta_lr", "loc_coef", "max_minutes", "lr", "epochs", "editor_loss", "retention_loss")
EQUALISE_FLAGS = {"gamma": "gamma", "ridge": "ridge", "n_iter": "n_iter", "penalty": "penalty"}
DAMA_FLAGS = {"null_dim": "null_dim", "dama_layers": "n_layers", "dama_update": "update", "max_requests": "max_requests"}
#: CLI flag -> field of the method variant (flags left at None keep the variant's own default)
TRAINING_FLAGS = {"loss": "loss", "lr": "lr", "epochs": "epochs", "max_steps": "max_steps", "eval_every": "eval_every",
                  "patience": "patience", "batch_size": "batch_size", "dev_limit": "dev_limit",
                  "retention_limit": "retention_limit", "retention_threshold": "retention_threshold",
                  "dev_metric": "dev_metric", "mass_weight": "mass_weight", "mass_floor": "mass_floor"}
HINT_FLAGS = {"hint_weight": "weight", "hint_loss": "loss", "ub_tolerance": "ub_tolerance"}
CONTRASTIVE_FLAGS = {"contrastive_mode": "mode", "alpha": "alpha", "contrastive_k": "k", "localisation": "localisation",
                     "reference_side": "reference", "reference": "reference_dir"}
#: contrastive reference-training flags -> ReferenceConfig fields (refused with a loaded --reference)
REFERENCE_FLAGS = {"reference_steps": "steps", "imp_rounds": "rounds", "prune_rate": "rate", "retrain_steps": "retrain_steps",
                   "lr": "lr"}


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}


def _refuse(args: argparse.Namespace, flags, method: str, applies: str) -> None:
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)} apply to {applies}, not to --method {method}")


def _method(args: argparse.Namespace):
    """The method variant of the flags (:mod:`bias_lens.edit.methods`; their defaults apply)."""
    from ..edit.methods import Dama, Equalise, Finetune, FullFinetune, HintAnchor, Masking, Prompt

    m = args.method
    if m not in ("msme", "lftf"):
        _refuse(args, ["hint_anchor", *HINT_FLAGS], m, "--method msme and lftf")
    if m != "mask":
        _refuse(args, ["mask_scale"], m, "--method mask")
    if m != "contrastive":
        _refuse(args, [*CONTRASTIVE_FLAGS, *(f for f in REFERENCE_FLAGS if f != "lr"), "no_transfer", "random_control"], m,
                "--method contrastive")
    if m != "dama":
        _refuse(args, DAMA_FLAGS, m, "--method dama")
    if m != "msme":
        _refuse(args, ["solver"], m, "--method msme")
    closed = _closed_form(args)
    if not closed:
        _refuse(args, [*EQUALISE_FLAGS, "no_hint_rows"], m, "--method equalise and --method msme's closed-form solver")
    if m != "editor":
        _refuse(args, ["bias", "editor", "shift_scale", *(f for f in EDITOR_TRAINING if f not in ("lr", "epochs"))], m,
                "--method editor")
    else:
        return _editor_method(args)
    training = _given(args, TRAINING_FLAGS)
    if closed:
        _refuse(args, [*(f for f in TRAINING_FLAGS if f not in ("retention_limit", "batch_size")), "hint_anchor",
                       *HINT_FLAGS], f"{m} (closed form)",
                "--method msme --solver finetune" if m == "msme" else "the fine-tuning methods (msme, lftf, fpft)")
        return Equalise(**_given(args, EQUALISE_FLAGS), keep_hint=not args.no_hint_rows,
                        **({"retention_limit": args.retention_limit} if args.retention_limit else {}))
    if m in ("msme", "lftf"):
        hint = HintAnchor(**_given(args, HINT_FLAGS)) if args.hint_anchor else None
        if not args.hint_anchor:
            _refuse(args, HINT_FLAGS, f"{m} without --hint-anchor", "--hint-anchor")
        return Finetune(paper=m, hint=hint, **training)
    if m == "fpft":
        return FullFinetune(**training)
    if m == "contrastive":
        return _contrastive_method(args)
    # --retention-limit and --batch-size also size the before/after measurement
    _refuse(args, [f for f in TRAINING_FLAGS if f not in ("retention_limit", "batch_size")], m,
            "the fine-tuning methods (msme, lftf, fpft, contrastive)")
    if m == "dama":
        return Dama(**_given(args, DAMA_FLAGS))
    return Masking(args.mask_scale if args.mask_scale is not None else 0.0) if m == "mask" else Prompt()


def _contrastive_method(args: argparse.Namespace):
    """The contrastive variant of the flags (a loaded ``--reference`` refuses the training flags)."""
    from ..edit.imp import ReferenceConfig
    from ..edit.methods import Contrastive

    _refuse(args, [f for f in TRAINING_FLAGS if f not in ("retention_limit", "batch_size", "lr")], "contrastive",
            "the fine-tuning methods (msme, lftf, fpft)")
    training = _given(args, REFERENCE_FLAGS)
    if args.reference is not None:
        if not (Path(args.reference) / "references.json").is_file():
            raise UsageError(f"--reference {args.reference} holds no saved references (needs references.json); "
                             "pass a folder written by a contrastive run (its record's reference_dir)")
        if training:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in REFERENCE_FLAGS if getattr(args, f) is not None)
            raise UsageError(f"{flags} configure reference training; a loaded --reference is already trained")
    return Contrastive(**_given(args, CONTRASTIVE_FLAGS), transfer=not args.no_transfer, control=args.random_control,
                       training=ReferenceConfig(**training))


def _check_reference(lm, plan) -> None:
    """A loaded ``--reference`` must hold this model's block matrices (names, shapes, dtypes) and every
    side the variant uses."""
    from ..edit.references import References

    try:
        meta = References.check(plan.method.reference_dir, lm)
    except ValueError as err:
        raise UsageError(f"--reference: {err}") from err
    missing = [s for s in plan.method.sides if s not in meta.get("sides", [])]
    if missing:
        raise UsageError(f"--reference {plan.method.reference_dir} has no {', '.join(missing)} reference "
                         f"(it holds {', '.join(meta.get('sides', []))}); drop --reference to train them")


def _editor_method(args: argparse.Namespace):
    """The BiasEdit variant of the flags (``--layers`` parsed; fine-tuning-only flags refused)."""
    from ..edit.methods import EditorMethod

    _refuse(args, [f for f in TRAINING_FLAGS if f not in ("retention_limit", "batch_size", "lr", "epochs")], "editor",
            "the fine-tuning methods (msme, lftf, fpft, contrastive)")
    layers = None
    if args.layers is not None:
        try:
            layers = tuple(int(x) for x in args.layers.split(","))
        except ValueError as err:
            raise UsageError(f"--layers takes comma-separated block numbers (e.g. 27,28,29), got {args.layers!r}") from err
    if args.editor is not None:
        folder = Path(args.editor)
        if not (folder / "editor.json").is_file() or not (folder / "editor.safetensors").is_file():
            raise UsageError(f"--editor {folder} holds no saved editor (needs editor.json and editor.safetensors)")
        given = [f"--{f.replace('_', '-')}" for f in EDITOR_TRAINING if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} configure editor training; a loaded --editor is already trained")
    return EditorMethod(layers=layers, **_given(args, EDITOR_FLAGS))


def _check_editor(lm, plan) -> None:
    """Editor options that need the model: blocks that exist, a loadable editor of this model's shapes."""
    m = plan.method
    if m.layers is not None and max(m.layers) >= lm.n_layers:
        raise UsageError(f"--layers {max(m.layers)} does not exist; {lm.name} has blocks 0..{lm.n_layers - 1}")
    if m.editor_dir is not None:
        from ..edit.editor import Editor

        try:
            Editor.load(lm, m.editor_dir)
        except ValueError as err:
            raise UsageError(f"--editor: {err}") from err


#: how ``--method msme`` solves its objective (``closed-form`` is the default)
SOLVERS = ("closed-form", "finetune")


#: where ``--method msme`` solves in closed form by default: one located matrix (flat nesting)
CLOSED_FORM_SCALES = ("module", "row", "neuron")


def _closed_form(args: argparse.Namespace) -> bool:
    """Whether the flags ask for the closed-form equalising solve: ``--method equalise``, or ``--method
    msme`` with ``--solver closed-form`` or, by default, at a scale that locates one matrix (module,
    row, neuron; flat nesting). Elsewhere (layer, attribution, MSME nesting) msme fine-tunes."""
    if args.method != "msme" or args.solver is not None:
        return args.method == "equalise" or args.solver == "closed-form"
    return args.scale in CLOSED_FORM_SCALES and args.nesting in (None, "flat")


def _plan(args: argparse.Namespace):
    from ..pipeline.plan import EditPlan, Where

    if args.nesting is not None and (args.method in MASKLESS_METHODS or args.scale == "attribution"):
        what = f"--method {args.method}" if args.method in MASKLESS_METHODS else f"--scale {args.scale}"
        raise UsageError(f"--nesting applies to the located module, row and neuron scales, not to {what}")
    if args.pick != "top" and args.scale is None:
        raise UsageError(f"--pick {args.pick} picks a located place; give --scale (layer, module, row or neuron)")
    try:
        where = None
        if args.scale is not None:
            where = Where(args.scale, args.k, neuron_params=args.neuron_params, drop=args.drop,
                          general_filter=not args.no_general_filter, nesting=args.nesting or "flat", pick=args.pick,
                          **_selection(args))
        closed = _closed_form(args)
        n = args.n_samples if args.n_samples is not None else (None if closed else 256)
        name = f"msme ({args.scale}, closed form)" if closed and args.method == "msme" and args.scale else None
        return EditPlan(_method(args), where, suite=args.suite, n_samples=n, seed=args.seed, name=name)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _selection(args: argparse.Namespace) -> dict[str, str]:
    """``Where``'s neuron selection: the paper pipeline by default for ``--scale attribution --method mask``."""
    if args.scale != "attribution" and (args.neuron_selection or args.causal_mode):
        raise UsageError("--neuron-selection / --causal-mode pick neurons at --scale attribution")
    default = "paper" if args.scale == "attribution" and args.method == "mask" else "attribution"
    selection = args.neuron_selection or default
    if args.causal_mode and selection != "paper":
        raise UsageError("--causal-mode is the paper pipeline's causal rule; pass --neuron-selection paper")
    return {"selection": selection, "causal_mode": args.causal_mode or "independent"}


#: MMLU is measured by default only where its longest 0-shot prompt (1,041 SmolLM2 tokens) fits
MMLU_MIN_POSITIONS = 2048


def _limits(args: argparse.Namespace, lm=None) -> dict[str, int | None]:
    """What ``bias-lens edit`` measures before/after: the edit suite, GenHintEval (UB), retention, and
    capability (MMLU where its prompts fit the context, arithmetic); BiasEdit adds StereoSet and CrowS."""
    limits = {args.suite: args.limit, "genhinteval": args.ub_limit or args.limit,
              "retention": args.retention_limit or None}
    if args.method == "editor":  # BiasEdit is measured on StereoSet (its bias type), CrowS-Pairs and capability
        limits.update({"stereoset" if (args.bias or "gender") == "gender" else f"stereoset_{args.bias}": None,
                       "crows-pairs": None})
    # capability is part of "nothing else broke" for every method (the export guards read it); by default MMLU
    # only where its longest prompt fits (--mmlu-limit asks for it anyway, and a too-short context is one error)
    fits = lm is None or getattr(lm.hf.config, "max_position_embeddings", MMLU_MIN_POSITIONS) >= MMLU_MIN_POSITIONS
    mmlu = args.mmlu_limit if args.mmlu_limit is not None else (1 if fits else 0)
    arith = args.arithmetic_limit if args.arithmetic_limit is not None else 150
    limits.update({k: v for k, v in (("mmlu", mmlu), ("arithmetic", arith)) if v > 0})
    return limits


def _check_inputs(args: argparse.Namespace, plan):
    """Validate files before any model is loaded; returns the locate result (or None)."""
    result = None
    if args.locate_json is not None:
        if plan.where is None:
            raise UsageError(f"--method {plan.method.name} edits no located weights; drop --locate-json")
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
        if plan.method.kind == "prompt":
            raise UsageError("--method prompt edits no weights, so there is nothing to export; drop --out")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            raise UsageError(f"--out {out} exists and is not empty; choose another folder or pass --force")
    return result


def _export(lm, run, args) -> str:
    from ..edit.export import base_folder, export_checkpoint
    from ..edit.patch import save_patch, weights_sha256

    out, rec = Path(args.out), run.record
    base = base_folder(lm)
    export_checkpoint(lm, out, method=run.edit.method, base_name=lm.name, hyperparams=rec.info.get("config", {}),
                      seed=rec.plan["seed"], metrics_before=rec.before, metrics_after=rec.metrics, force=args.force,
                      extra={"scale": args.scale, "plan": rec.plan, "locate": {"labels": rec.labels},
                             "mask_size": rec.cost_p, "n_params_edited": rec.n_changed})
    try:
        save_patch(run.edit, out / PATCH_DIR, originals=run.handle.originals, base_name=lm.name,
                   base_sha256=weights_sha256(base) if base else None)
        if "editor" in run.artifacts:
            run.artifacts["editor"].save(out / EDITOR_DIR)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # the checkpoint was just created by us: leave nothing half-done
        raise
    return str(out)


#: exit status of an edit that changed no weights (a guard rolled it back, or the mask was empty)
EXIT_UNCHANGED = 3


def unchanged_reason(rec: EditRecord) -> str | None:
    """``None`` when the edit changed weights; else one line naming the guard and its numbers."""
    if rec.n_changed > 0:
        return None
    status = rec.info.get("status") or "done"
    hist = rec.info.get("history") or []
    if status == "retention_rollback" and len(hist) > 1 and hist[-1].get("retention_ppl") is not None:
        base, last = hist[0]["retention_ppl"], hist[-1]["retention_ppl"]
        thr = (rec.info.get("config") or {}).get("retention_threshold")
        return (f"the retention guard rolled the edit back at step {hist[-1].get('step')} (perplexity {last:.2f} > "
                f"{base:.2f} x (1 + {thr})) before any accepted step, so 0 weights changed")
    if status == "early_stopped" and hist:
        key = next((k for k in hist[0] if k.startswith("dev_") and k not in ("dev_ub", "dev_mass")), "dev_afgb")
        return (f"early stopping kept step 0: no accepted step lowered {key} below {hist[0].get(key, float('nan')):.4f}, "
                "so 0 weights changed")
    if status == "empty_selection":
        n = len((rec.info.get("neuron_selection") or {}).get("filtered", []))
        return (f"causal selection kept none of the {n} candidates (no mask lowered the dev bias within the "
                "retention limits), so 0 weights changed")
    return f"the edit changed 0 weights (fine-tuning status {status})"


def run(args: argparse.Namespace) -> int:
    """Apply the plan built from the flags, export to ``--out`` unless nothing changed (exit 3), then undo."""
    from ..pipeline.driver import apply_plan

    plan = _plan(args)
    result = _check_inputs(args, plan)
    lm = model_from_args(args)
    if plan.method.kind == "editor":
        _check_editor(lm, plan)
    if plan.method.kind == "contrastive" and plan.method.reference_dir is not None:
        _check_reference(lm, plan)
    measure_batch = 32 if plan.method.kind == "editor" else args.batch_size or 32
    try:
        edit_run = apply_plan(lm, plan, result, limits=_limits(args, lm), batch_size=measure_batch)
    except RuntimeError as err:
        raise UsageError(str(err)) from err
    rec = edit_run.record
    failed = unchanged_reason(rec) if plan.method.kind != "prompt" else None
    try:
        out = _export(lm, edit_run, args) if args.out and edit_run.edit is not None and not failed else None
    finally:
        if edit_run.handle is not None:
            edit_run.handle.undo()
    _report(args, plan, rec, out, failed)
    if failed:
        print(f"bias-lens edit: failed: {failed}; nothing exported", file=sys.stderr)
        return EXIT_UNCHANGED
    return 0


def _report(args: argparse.Namespace, plan, rec, out: str | None, failed: str | None) -> None:
    """The edit record on stdout (JSON with ``--json``, else a before -> after table)."""
    if args.json:
        payload = {**rec.to_dict(), "method": plan.method.name, "scale": plan.scale, "n_params_edited": rec.n_changed,
                   "mask_size": rec.cost_p, "after": rec.metrics, "out": out,
                   "status": "unchanged" if failed else rec.info.get("status"),
                   "solver": "closed-form" if _closed_form(args) else "finetune" if args.method in ("msme", "lftf") else None,
                   "finetune_status": rec.info.get("status"), "reason": failed, "locate": rec.labels[:20]}
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
        return
    print(f"edit {plan.method.name} at scale {plan.scale}: {rec.n_changed} weights changed (Cost-P {rec.cost_p})")
    for k in rec.before:
        print(f"  {k:<16} {rec.before[k]:>10.4f} -> {rec.metrics[k]:.4f}")
    if out:
        print(f"exported to {out} (patch in {Path(out) / PATCH_DIR})")
