"""Orchestration of the main job: stages, progress bars, cache, atomic output folder."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataclasses import asdict

from .config import PER_SUBJECT, RunConfig, model_fingerprint
from .edit_stage import ExportRule

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    from .. import __version__

    out = {"bias_lens": __version__}
    for pkg in ("torch", "transformers", "transformer-lens", "nnsight", "plotly"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True)


def default_out(root: Path | None = None) -> Path:
    """A fresh timestamped output folder under ``root`` (default ``runs/``)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (root or Path("runs")) / stamp


def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless ``force`` (checked before any work)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"output folder {out} exists and is not empty; choose another --out or pass --force")


def run_pipeline(cfg: RunConfig, out: Path | None = None, *, force: bool = False, use_cache: bool = True,
                 progress: bool = True, command: str = "bias-lens run", lm: LensModel | None=None) -> Path:
    """Run every stage of the main job and write ``out`` (report, figures, checkpoint, patch).

    Stage results go to the cache as soon as they exist; ``out`` is built in a temporary sibling
    folder and renamed into place at the end, so an interrupted run leaves no half-written output.
    """
    from ..io import make_temp_dir, replace_dir
    from ..lens import load_model
    from ..loading import cache_root
    from .cache import StageCache

    out = Path(out) if out is not None else default_out()
    check_out(out, force)
    t0 = time.perf_counter()
    lm = lm if lm is not None else load_model(cfg.model)
    key = cfg.key(model_fingerprint(lm))
    cache = StageCache(cache_root(), key, enabled=use_cache)
    log.info("run key %s (cache %s)", key, cache.dir if use_cache else "off")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp")
    try:
        stage_s: dict[str, float] = {"load": time.perf_counter() - t0}

        def timed(name: str, fn, *a):
            t = time.perf_counter()
            out = fn(*a)
            stage_s[name] = round(time.perf_counter() - t, 1)
            return out

        evals = timed("evaluate", _evaluate_stage, lm, cfg, cache, progress)
        results = timed("locate", _locate_stage, lm, cfg, cache, progress)
        org, org_details, rows = timed("edit", _edit_stage, lm, cfg, results, cache, progress)
        best, extra_figs = timed("export", _export_stage, lm, cfg, org, org_details, rows, cache, tmp, progress)
        meta = {"model": lm.name, "command": command, "config": cfg.to_dict(), "key": key,
                "export_rule": asdict(ExportRule()), "stage_s": stage_s,
                "versions": _versions(), "wall_s": time.perf_counter() - t0,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"}
        _report_stage(tmp, cfg, meta, evals, org, rows, results, best, extra_figs, progress)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("report written to %s", out / "report.md")
    return out


def _evaluate_stage(lm, cfg: RunConfig, cache, progress: bool) -> dict[str, dict]:
    """1. every suite of ``cfg.eval_limits`` on its test split (cached per suite)."""
    from ..benchmarks import evaluate

    evals: dict[str, dict] = {}
    with _bar(len(cfg.eval_limits), "1/5 evaluate", progress) as bar:
        for suite, limit in cfg.eval_limits.items():
            rec = cache.get_json(f"eval_{suite}")
            if rec is None:
                kw = {"limit_per_subject": limit} if suite in PER_SUBJECT else {"limit": limit}
                r = evaluate(lm, suite, "test", batch_size=8 if suite == "genbiaspro-cg" else cfg.batch_size, **kw)
                rec = cache.put_json(f"eval_{suite}", r.to_dict())
            evals[suite] = rec
            bar.update(1)
    return evals


def _locate_stage(lm, cfg: RunConfig, cache, progress: bool) -> dict[str, Any]:
    """2. every locate method on the suite's train prompts (and GenBiasPro-CG's for layer/BMI)."""
    from ..benchmarks import load_split, sample_prompts
    from .locate_stage import locate_all

    prompts = sample_prompts(cfg.suite, "train", cfg.n_locate, seed=cfg.locate_seed)
    cg = sample_prompts("genbiaspro-cg", "train", cfg.n_locate, seed=cfg.locate_seed)
    dev = [s["prompt"] for s in load_split(cfg.suite, "dev")][: cfg.n_causal_dev]
    n_steps = 15 + (1 if cfg.bmi_robustness else 0)
    with _bar(n_steps, "2/5 locate", progress) as bar:
        return locate_all(lm, cfg, prompts, dev, cache, lambda name: (bar.set_postfix_str(name), bar.update(1)),
                          cg_prompts=cg)


def _edit_stage(lm, cfg: RunConfig, results: dict[str, Any], cache, progress: bool):
    """3. the unedited model's columns, then every row through the one driver (each undone)."""
    from .edit_stage import run_row
    from .report import markdown_table

    with _bar(len(cfg.rows) + 1, "3/5 edit", progress) as bar:
        org, prefix = _org_metrics(lm, cfg, cache)
        bar.update(1)
        org_details = org.pop("_details", [])
        rows = []
        for row in cfg.rows:
            bar.set_postfix_str(row.label)
            rows.append(run_row(lm, cfg, row, results, cache, org, prefix))
            bar.update(1)
        if prefix is not None:
            log.info("prefix cache: %d replayed batches, %d run in full (%.0f MB held)", prefix.hits, prefix.misses,
                     prefix.nbytes / 2**20)
    log.info("edit table:\n%s", markdown_table(org, rows))
    return org, org_details, rows


def _org_metrics(lm, cfg: RunConfig, cache):
    """The unedited model's columns (cached) and, when a row still has to be measured, the block inputs
    of that measurement (:mod:`bias_lens.prefix_cache`; measured again if the columns came from the cache)."""
    from ..prefix_cache import PrefixCache, checkpoints, record
    from .measure import measure

    org = cache.get_json("org_metrics")
    todo = any(cache.get_json(f"edit_{row.label}") is None for row in cfg.rows)
    layers = checkpoints(lm.n_layers) if cfg.prefix_cache else ()
    if not (todo and layers):
        if org is None:
            org = cache.put_json("org_metrics", measure(lm, cfg.row_limits, batch_size=cfg.batch_size, details=True))
        return org, None
    prefix = PrefixCache(layers)
    with record(lm, prefix):
        got = measure(lm, cfg.row_limits, batch_size=cfg.batch_size, details=True)
    return (org if org is not None else cache.put_json("org_metrics", got)), prefix


def _export_stage(lm, cfg: RunConfig, org, org_details, rows, cache, tmp: Path, progress: bool):
    """4. the best row (see ``choose_best``) exported as a verified checkpoint + patch."""
    from .edit_stage import choose_best
    from .figures import profession_bars, table_figure

    best = choose_best(org, rows)
    extra_figs = [("edits_tradeoff", table_figure(org, rows))]
    with _bar(1, "4/5 export", progress) as bar:
        if best is not None:
            after_details = _export_best(lm, cfg, best, org, cache, tmp)
            extra_figs.append(("profession_before_after", profession_bars(org_details, after_details, best["name"])))
        bar.update(1)
    return best, extra_figs


def _report_stage(tmp: Path, cfg: RunConfig, meta, evals, org, rows, results, best, extra_figs, progress) -> None:
    """5. figures, report.md / report.html, results.json and the locate results."""
    from ..benchmarks import split_sizes
    from ..locate.result import LocateResult
    from .figures import locate_figures, write_all
    from .report import write_reports

    with _bar(2, "5/5 report", progress) as bar:
        figs = locate_figures(results) + extra_figs
        written = write_all(figs, tmp / "figures", png=not cfg.quick)  # --quick: HTML only (PNGs cost ~90 s)
        bar.update(1)
        meta["split_sizes"] = {s: split_sizes(s) for s in cfg.eval_limits}
        write_reports(tmp, meta=meta, evals=evals, org=org, rows=rows, results=results, figures=written,
                      best=best, figs_objs=figs)
        (tmp / "results.json").write_text(json.dumps({"meta": meta, "evaluate": evals, "org": org, "rows": rows,
                                                      "best": best["name"] if best else None}, indent=1))
        (tmp / "locate").mkdir(exist_ok=True)
        for name, res in results.items():
            if isinstance(res, LocateResult):  # not hasattr(.., "save"): nnsight adds .save to every object
                res.save(tmp / "locate" / f"{name}.json")
            else:
                (tmp / "locate" / f"{name}.json").write_text(json.dumps(res))
        bar.update(1)


def _export_best(lm, cfg: RunConfig, best: dict[str, Any], org: dict[str, float], cache, tmp: Path) -> list[dict]:
    """Re-apply the best row's cached patch, export checkpoint + patch into ``tmp``, undo."""
    from ..edit.export import export_checkpoint
    from ..edit.patch import load_patch, save_patch
    from .measure import measure

    edit, _, manifest = load_patch(cache.patch_dir(f"edit_{best['name']}"))
    handle = edit.apply_(lm.hf)
    try:
        export_checkpoint(lm, tmp / "checkpoint", method=best["name"], base_name=lm.name,
                          hyperparams=best.get("plan", {}), seed=cfg.seed, metrics_before=org,
                          metrics_after=best["metrics"])
        save_patch(edit, tmp / "patch", originals=handle.originals, base_name=lm.name)
        details = measure(lm, {"genbiaseval": cfg.row_limits.get("genbiaseval")}, batch_size=cfg.batch_size,
                          details=True)["_details"]
    finally:
        handle.undo()
    return details
