"""``bias-lens locate trace``: bias tracing (ROME's causal tracing on the stereotype gap, BiasEdit).

Registered under ``locate`` by :func:`register_trace` (a ``locate`` with subparsers) or
:func:`attach_to_locate` (a ``locate`` with a positional METHOD). Items: the first ``--limit`` of BiasEdit's
StereoSet tracing file for ``--bias`` (``data/stereoset/bias_tracing_gender.json``) or
``--items-file`` (a JSON list in the same format); items BiasEdit skips are counted. ``--out DIR``
(new or empty; ``--force`` replaces it; built in a temporary sibling and renamed into place) gets
``result.json`` (the per-layer :class:`~bias_lens.locate.result.LocateResult` of
``--summary-component``, loadable by ``LocateResult.load`` and usable for editing),
``trace.json`` (every item's ``[component, layer, position]`` gaps) and the heatmaps
``roles_<component>`` (recovery by token role) and ``item0_<component>`` (the first item).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from . import UsageError, add_json_arg, add_model_arg, model_from_args

log = logging.getLogger(__name__)


def register_trace(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``trace`` parser to ``sub`` (the ``locate`` command's subparsers)."""
    p = sub.add_parser("trace", help="bias tracing: corrupt the bias-attribute tokens, restore states, "
                       "measure how much of the stereotype gap comes back")
    add_trace_args(p)
    return p


def attach_to_locate(p: argparse.ArgumentParser) -> None:
    """Make ``trace`` a METHOD of a ``locate`` parser that takes a positional ``method`` (the current
    ``cli/locate.py``): adds ``trace`` to its choices, the trace options it lacks (shared ones such
    as ``--model``, ``--out``, ``--seed``, ``--batch-size``, ``--top``, ``--json`` keep locate's), and
    routes ``trace`` to :func:`run`. Call it at the end of ``locate.register``."""
    method = next(a for a in p._actions if a.dest == "method")
    method.choices = (*method.choices, "trace")
    probe = argparse.ArgumentParser(add_help=False)
    add_trace_args(probe)
    for action in probe._actions:
        if action.option_strings and not any(o in p._option_string_actions for o in action.option_strings):
            p._add_action(action)
    locate_run = p.get_default("func")

    def dispatch(args: argparse.Namespace) -> int:
        return run(args) if args.method == "trace" else locate_run(args)

    dispatch.__wrapped__ = locate_run  # type: ignore[attr-defined]
    p.set_defaults(func=dispatch)


def add_trace_args(p: argparse.ArgumentParser) -> None:
    """Add the causal-tracing options (data, components, noise) shared by the trace commands."""
    add_model_arg(p)
    p.add_argument("--bias", default="gender", help="tracing data set (default gender; BiasEdit ships gender)")
    p.add_argument("--items-file", default=None, help="JSON list of items in BiasEdit's format instead of --bias")
    p.add_argument("--limit", type=int, default=20, help="first N items of the data (default 20)")
    p.add_argument("--components", default="resid,mlp,attn", help="comma-separated of resid,mlp,attn (default all)")
    p.add_argument("--n-noise", type=int, default=10, help="noise samples per sentence (default 10, as ROME)")
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise std = this x embedding std (default 3)")
    p.add_argument("--noise-std", type=float, default=None, help="base std instead of the std over ROME's knowns")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--positions", choices=("all", "roles"), default="all",
                   help="restore every position (default) or only subject/before-attribute/attribute/last")
    p.add_argument("--gap", choices=("abs", "signed"), default="abs", help="|anti - stereo| (BiasEdit) or stereo - anti")
    p.add_argument("--noise-mode", choices=("add", "replace"), default="add", help="add noise (default) or replace")
    p.add_argument("--span", choices=("substring", "word"), default="substring", help="subject matching (BiasEdit: substring)")
    p.add_argument("--prefix", choices=("bos", "none"), default="bos", help="BOS token before each sentence (default)")
    p.add_argument("--summary-component", default=None,
                   help="component of the per-layer result.json (default mlp when traced, else the first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--top", type=int, default=10, help="layers in the printed table (default 10)")
    p.add_argument("--out", default=None, metavar="DIR", help="write result.json, trace.json and heatmaps here")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--plotlyjs", choices=("directory", "cdn", "inline"), default="directory",
                   help="how HTML figures get plotly.js (default: one shared file beside them)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _check_out(out: str | None, force: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(f"--out {out} exists and is not empty; choose another folder or pass --force")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"--out parent folder {path.absolute().parent} does not exist; create it first")
    return path


def _check(args: argparse.Namespace) -> list[str]:
    for flag, v in (("--limit", args.limit), ("--n-noise", args.n_noise), ("--window", args.window),
                    ("--batch-size", args.batch_size), ("--top", args.top)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if not args.noise_scale > 0:
        raise UsageError(f"--noise-scale must be > 0, got {args.noise_scale}")
    if args.noise_std is not None and not args.noise_std > 0:
        raise UsageError(f"--noise-std must be > 0, got {args.noise_std}")
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    bad = [c for c in comps if c not in ("resid", "mlp", "attn")]
    if bad or not comps:
        raise UsageError(f"--components takes a comma-separated subset of resid,mlp,attn; got {args.components!r}")
    if args.summary_component is None:
        args.summary_component = "mlp" if "mlp" in comps else comps[0]
    if args.summary_component not in comps:
        raise UsageError(f"--summary-component {args.summary_component!r} is not among --components {','.join(comps)}")
    if args.items_file is not None and not Path(args.items_file).is_file():
        raise UsageError(f"--items-file {args.items_file} does not exist")
    args.out_dir = _check_out(args.out, args.force)
    return comps


def _write_out(out: Path, trace, summary, plotlyjs: str) -> list[Path]:
    from ..io import make_temp_dir, replace_dir
    from ..plot.io import write_figure
    from ..plot.tracing import trace_heatmap, trace_role_heatmap

    figs = {}
    for comp in trace.components:
        figs[f"roles_{comp}"] = trace_role_heatmap(trace, comp)
        figs[f"item0_{comp}"] = trace_heatmap(trace, 0, comp)
    tmp = make_temp_dir(out.absolute().parent, f".{out.name}.tmp")
    try:
        written = [summary.save(tmp / "result.json")]
        (tmp / "trace.json").write_text(json.dumps(trace.to_dict()))
        written.append(tmp / "trace.json")
        for name, fig in figs.items():
            written += write_figure(fig, tmp / name, plotlyjs=plotlyjs)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / p.name for p in written]


def run(args: argparse.Namespace) -> int:
    """Run bias causal tracing on the chosen items and print or save the traced effects; returns the exit status."""
    comps = _check(args)
    from ..locate.tracing import bias_trace
    from ..locate.tracing_data import load_json_items, load_tracing_items

    if args.items_file is not None:
        items = load_json_items(args.items_file)[: args.limit]
    else:
        items = load_tracing_items(args.bias, limit=args.limit)

    lm = model_from_args(args)
    trace = bias_trace(lm, items, components=comps, n_noise=args.n_noise, noise_scale=args.noise_scale,
                       noise_std=args.noise_std, window=args.window, seed=args.seed, batch_size=args.batch_size,
                       gap=args.gap, noise_mode=args.noise_mode, prefix=args.prefix, span=args.span,
                       positions=args.positions)
    summary = trace.to_locate_result(args.summary_component)
    summary.model = summary.model or lm.name
    if args.out_dir is not None:
        written = _write_out(args.out_dir, trace, summary, args.plotlyjs)
        for path in written:
            log.info("wrote %s", path)
        print(f"bias-lens locate trace: wrote {len(written)} files to {args.out_dir}", file=sys.stderr)
    if args.json:
        json.dump(trace.to_dict() | {"summary": summary.to_dict()}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"bias trace ({trace.variant}) on {summary.model}: {len(trace.items)} items, {trace.n_skipped} skipped")
    for it in trace.items[:5]:
        print(f"  {it.id}: clean gap {it.clean_gap:.4f}, corrupted {it.corrupted_gap:.4f}")
    print(f"  layers by max {args.summary_component} recovery over token roles:")
    for label, score in summary.top(args.top):
        print(f"  {label:<8} {score: .4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m bias_lens.cli.trace ...``) until ``locate`` registers it."""
    from . import _quiet_third_party, user_errors

    ap = argparse.ArgumentParser(prog="bias-lens locate trace", description=__doc__.splitlines()[0])
    add_trace_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _quiet_third_party()
    try:
        return run(args)
    except user_errors() as err:
        print(f"bias-lens locate trace: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
