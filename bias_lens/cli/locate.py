"""``bias-lens locate METHOD``: find which layers, modules, rows, entries, neurons or heads carry bias.

Prompts: ``--n-samples`` prompts of ``--suite``/``--split`` drawn with ``--seed`` (default 200 of
GenBiasEval train), or ``--prompts-file`` (one raw prompt per line). Everything the user can get
wrong is checked before the model is loaded; nothing is written unless the whole run succeeds.
``--out DIR`` gets ``result.json`` and the method's figures: the folder must be new or empty
(``--force`` replaces it), is built in a temporary sibling and renamed into place
(:meth:`bias_lens.locate.result.LocateResult.save_dir`), so it never mixes an old run's files
with a new one's; the folder written is reported on stderr. ``--plotlyjs`` says how the HTML figures get plotly.js
(default ``directory``: one shared ``plotly.min.js`` beside them, works offline).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import UsageError, add_json_arg, add_model_arg, model_from_args

log = logging.getLogger(__name__)
METHODS = ("layer", "bmi", "module", "row", "neuron", "attribution", "general-neurons", "causal", "circuit")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``locate`` command and the options of every locate method."""
    p = sub.add_parser("locate", help="locate bias: layer, bmi, module, row, neuron, attribution, general-neurons, causal, circuit")
    p.add_argument("method", choices=METHODS, metavar="METHOD", help=" | ".join(METHODS))
    add_model_arg(p)
    p.add_argument("--suite", default=None, help="benchmark suite to sample prompts from (default: genbiaseval)")
    p.add_argument("--split", default="train", help="split of --suite (default: train)")
    p.add_argument("--n-samples", type=int, default=200, help="prompts drawn from the split (default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--prompts-file", default=None, help="one raw prompt per line (instead of --suite)")
    p.add_argument("--targets", default="he,she", help="comma-separated target words, male first (default he,she)")
    p.add_argument("--module", default=None,
                   help="module for row/neuron, e.g. L29.mlp.down on SmolLM2 (required; `locate module` ranks them)")
    p.add_argument("--top", type=int, default=20, help="rows of the printed table (default 20)")
    p.add_argument("--out", default=None, metavar="DIR", help="write result.json and figures (html; png with a Chrome) "
                   "into this new or empty folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--plotlyjs", choices=("directory", "cdn", "inline"), default="directory",
                   help="HTML figures: one shared plotly.min.js beside them (directory, default, offline), "
                   "loaded from the plotly CDN (cdn), or embedded in each file (inline, 4.8 MB each)")
    p.add_argument("--lens", choices=("hf", "tl", "nnsight"), default="hf", help="layer/bmi: which view runs the pass")
    p.add_argument("--norm", choices=("recompute", "cached"), default=None, help="final-norm mode (layer, attribution)")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (module, attribution)")
    p.add_argument("--modules", default=None, help="comma-separated module kinds for module, e.g. attn.o,mlp.down")
    p.add_argument("--order", choices=("descending", "ascending"), default="descending", help="row/neuron: row ranking")
    p.add_argument("--keep", type=float, default=0.5, help="row/neuron: fraction of rows kept (default 0.5)")
    p.add_argument("--heads", action="store_true", help="attribution: score attention heads instead of FFN neurons")
    p.add_argument("--k", type=int, default=None, help="causal: neurons to select (50); circuit: upstream nodes per node (5)")
    p.add_argument("--candidates", type=int, default=50, help="causal: top attribution neurons tried (default 50)")
    p.add_argument("--dev-split", default="dev", help="causal: split measured on (default dev; the prompts file otherwise)")
    p.add_argument("--from", dest="root", default=None, metavar="L12N34", help="circuit: the neuron to trace from")
    p.add_argument("--depth", type=int, default=2, help="circuit: levels traced (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_arg(p)
    p.set_defaults(func=run)
    from .trace import attach_to_locate

    attach_to_locate(p)  # `bias-lens locate trace`: BiasEdit / ROME bias tracing (cli/trace.py)


# --------------------------------------------------------------------------- validation
def _int_list(spec: str | None, flag: str) -> list[int] | None:
    if spec is None:
        return None
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as err:
        raise UsageError(f"{flag} takes comma-separated integers, e.g. 0,5,29; got {spec!r}") from err
    if not out:
        raise UsageError(f"{flag} is empty; give comma-separated integers, e.g. 0,5,29")
    return out


def _check_out(out: str | None, force: bool) -> Path | None:
    """``--out`` checked before the model loads (:func:`bias_lens.locate.result.check_out_dir`)."""
    if out is None:
        return None
    from ..locate.result import check_out_dir

    try:
        return check_out_dir(out, force, force_hint="--force")
    except ValueError as err:
        raise UsageError(f"--out {err}") from err


def _validate(args: argparse.Namespace) -> None:
    from ..arch import parse_module_name, parse_neuron_name
    from ..targets import parse_words

    for flag, v, lo in (("--n-samples", args.n_samples, 1), ("--batch-size", args.batch_size, 1), ("--top", args.top, 1),
                        ("--depth", args.depth, 1), ("--candidates", args.candidates, 1)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.k is not None and args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if not 0 < args.keep <= 1:
        raise UsageError(f"--keep must be a fraction in (0, 1], got {args.keep}")
    if args.suite is not None and args.prompts_file is not None:
        raise UsageError("give either --suite or --prompts-file, not both")
    parse_words(args.targets)
    if args.method in ("row", "neuron"):
        if args.module is None:
            raise UsageError(f"{args.method} needs --module L{{layer}}.mlp.down (or another weight matrix); "
                             "`bias-lens locate module` ranks the modules")
        try:
            parse_module_name(args.module)
        except ValueError as err:
            raise UsageError(f"--module: {err}") from err
    if args.method == "circuit":
        if args.root is None:
            raise UsageError("circuit needs --from L{layer}N{neuron}, e.g. --from L12N34")
        try:
            parse_neuron_name(args.root)
        except ValueError as err:
            raise UsageError(f"--from: {err}") from err
    args.layer_list = _int_list(args.layers, "--layers")
    args.module_list = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    if args.modules is not None and not args.module_list:
        raise UsageError("--modules is empty; give kinds like attn.o,mlp.down")
    args.out_dir = _check_out(args.out, args.force)


# --------------------------------------------------------------------------- dispatch
def _locate(args: argparse.Namespace, lm, prompts: list[str]):
    """Run the method; returns (LocateResult, extra payload for figures)."""
    m, bs, pb = args.method, args.batch_size, not args.no_progress
    if m in ("layer", "bmi"):
        from ..locate import layers

        if m == "bmi":
            return layers.bmi(lm, prompts, lens=args.lens, batch_size=bs, progress=pb), None
        return layers.layer_scale(lm, prompts, args.targets, norm=args.norm or "recompute", lens=args.lens, batch_size=bs, progress=pb), None
    if m == "module":
        from ..locate.modules import module_scale

        return module_scale(lm, prompts, args.targets, layers=args.layer_list, modules=args.module_list, batch_size=bs, progress=pb), None
    if m == "row":
        from ..locate.gradients import row_scale

        return row_scale(lm, prompts, args.module, args.targets, order=args.order, keep=args.keep, batch_size=bs, progress=pb), None
    if m == "neuron":
        from ..locate.gradients import neuron_scale

        return neuron_scale(lm, prompts, args.module, args.targets, order=args.order, keep=args.keep, batch_size=bs, progress=pb), None
    if m == "attribution":
        from ..locate.attribution import head_attribution, neuron_attribution

        norm = args.norm or "cached"
        if args.heads:
            return head_attribution(lm, prompts, args.targets, norm=norm, batch_size=bs, progress=pb), None
        return neuron_attribution(lm, prompts, args.targets, norm=norm, layers=args.layer_list, batch_size=bs, progress=pb), None
    if m == "general-neurons":
        from ..locate.general_neurons import detect_general, position_stats

        stats = position_stats(lm, prompts, targets=args.targets, batch_size=min(bs, 16))
        return detect_general(stats, model=lm.name), None
    if m == "causal":
        return _causal(args, lm, prompts), None
    from ..locate.circuit import trace_circuit

    graph = trace_circuit(lm, args.root, prompts, top_k=args.k or 5, depth=args.depth, batch_size=bs)
    return graph.to_result(), graph


def _causal(args: argparse.Namespace, lm, prompts: list[str]):
    """Candidates = top attribution neurons on the locating prompts; measured on the dev prompts."""
    from ..locate.attribution import neuron_attribution
    from ..locate.causal import causal_selection
    from ..locate.prompts import resolve_prompts

    dev = prompts if args.prompts_file else resolve_prompts(args.suite, args.dev_split, args.n_samples, args.seed)
    cand = neuron_attribution(lm, prompts, args.targets, batch_size=args.batch_size,
                              progress=not args.no_progress).top_labels(args.candidates)
    res = causal_selection(lm, cand, dev, args.targets, k=args.k or 50, progress=not args.no_progress)
    res.extras["dev_split"] = "prompts-file" if args.prompts_file else args.dev_split
    return res


# --------------------------------------------------------------------------- figures and output
def _figures(method: str, result, payload) -> dict:
    """name -> plotly figure for the method (empty when its plot module is not available)."""
    if method == "row":
        from ..plot.gradients import row_cosine_histogram, row_cosine_strip

        return {"row_cosines": row_cosine_histogram(result), "row_cosines_by_row": row_cosine_strip(result)}
    if method == "neuron":
        from ..plot.gradients import entry_heatmap

        return {"entries": entry_heatmap(result), "entries_max_importance": entry_heatmap(result, value="max")}
    if method == "attribution":
        from ..plot.attribution import head_heatmap, neuron_heatmap

        return {"heads": head_heatmap(result)} if "heads" in result.variant else {"neurons": neuron_heatmap(result)}
    if method == "circuit":
        from ..plot.circuit import circuit_figure

        return {"circuit": circuit_figure(payload)}
    if method in ("layer", "bmi", "module"):
        from ..plot import locate as pl

        if method == "layer":
            return {"layers": pl.layer_figure(result), "layer_prompt": pl.layer_prompt_heatmap(result),
                    "argmax_layer": pl.argmax_histogram(result)}
        if method == "bmi":
            return {"bmi": pl.bmi_figure(result)}
        figs = {"modules": pl.module_heatmap(result)}
        if "matrix_final" in result.extras:
            figs["modules_final"] = pl.module_heatmap(result, final=True)
        return figs
    return {}


def _write_out(out: Path, result, payload, plotlyjs: str, force: bool) -> list[Path]:
    """``result.json`` and the figures into ``out`` (:meth:`LocateResult.save_dir`: temporary sibling, then renamed)."""
    from ..plot.io import write_figure

    figs = _figures(result.method, result, payload)  # build everything before the first write

    def write_figures(folder: Path) -> list[Path]:
        return [p for name, fig in figs.items() for p in write_figure(fig, folder / name, plotlyjs=plotlyjs)]

    return result.save_dir(out, force=force, extra=write_figures)


def _print_table(result, k: int, n_prompts: int) -> None:
    print(f"{result.method} ({result.variant}) on {result.model}, {n_prompts} prompts")
    for key in ("n_selected", "n_entries", "n_rows"):
        if key in result.extras:
            print(f"  {key}: {result.extras[key]}")
    for label, score in result.top(k):
        print(f"  {label:<32} {score: .6g}")


def run(args: argparse.Namespace) -> int:
    """Run one locate method on the sampled prompts and print or save its :class:`LocateResult`; returns the exit
    status."""
    _validate(args)
    from ..locate.prompts import resolve_prompts

    prompts = resolve_prompts(args.suite, args.split, args.n_samples, args.seed, prompts_file=args.prompts_file)

    lm = model_from_args(args)
    result, payload = _locate(args, lm, prompts)
    result.model = result.model or lm.name
    if args.out_dir is not None:
        written = _write_out(args.out_dir, result, payload, args.plotlyjs, args.force)
        for path in written:
            log.info("wrote %s", path)
        print(f"bias-lens locate: wrote {len(written)} files to {args.out_dir}", file=sys.stderr)
    if args.json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_table(result, args.top, len(prompts))
    return 0
