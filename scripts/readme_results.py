"""Render the README's "Results on SmolLM2" block from a committed run, so its numbers are that run's.

    python scripts/readme_results.py RUN_DIR          # copy RUN_DIR's results, report and figures
                                                      # into figures/ and rewrite the README block
    python scripts/readme_results.py --check          # exit 1 if README's block != render(figures/)

``RUN_DIR`` is the output folder of ``bias-lens run`` (``results.json``, ``report.md``, ``locate/``,
``figures/``). The block sits between ``<!-- results:begin -->`` and ``<!-- results:end -->``;
everything in it is rendered from ``figures/results.json`` and ``figures/locate/*.json``
(the test suite runs ``--check``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT / "figures"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _metrics_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def render(fig: Path = FIG) -> str:
    """The README block (markdown) rendered from ``fig/results.json`` and ``fig/locate/*.json``."""
    sys.path.insert(0, str(ROOT))
    from bias_lens.locate.result import LocateResult
    from bias_lens.pipeline.report import LEGEND, _locate_summary, control_lines, markdown_table, rule_from_meta, seed_lines

    res = json.loads((fig / "results.json").read_text())
    meta = res["meta"]
    out = [BEGIN, "",
           f"From `{meta['command']}` (preset {'quick' if meta['config']['quick'] else 'full'}), wall time "
           f"**{meta['wall_s'] / 60:.1f} min** on {meta['machine']}; torch "
           f"{meta['versions'].get('torch', '?')}. Every number below is rendered from that run's "
           "`figures/results.json` by `scripts/readme_results.py` (a test checks they agree). Full report: "
           "[figures/report.md](figures/report.md).", "",
           "**Before editing** (test splits; n = samples scored, a fixed-seed subset where it is below the split "
           "size that `bias-lens datasets` lists; raw metrics are the papers' literal ones, `_renorm` = over the "
           "target pair renormalised, `mass` = mean summed target probability):", "",
           "| suite | n | metrics |", "|---|---:|---|"]
    for suite, e in res["evaluate"].items():
        out.append(f"| {suite} | {e['n']} | {_metrics_line(e['metrics'])} |")
    results: dict = {p.stem: LocateResult.load(p) for p in sorted((fig / "locate").glob("*.json"))
                     if p.stem not in ("circuit", "agreement", "projection")}  # plain dicts, not LocateResults
    if (fig / "locate" / "agreement.json").exists():  # a plain dict (locate.agreement.Agreement.to_dict)
        results["agreement"] = json.loads((fig / "locate" / "agreement.json").read_text())
    out += ["", "**Located** (200 GenBiasEval train prompts; top 5 per method):", "", *_locate_summary(results), "",
            "**Edited** (train: GenBiasEval train samples, early stopping on dev; every row measured on test "
            "subsets and undone; row limits " + ", ".join(f"{k} {v}" for k, v in meta["config"]["row_limits"].items())
            + "):", "", markdown_table(res["org"], res["rows"]), "", LEGEND, ""]
    best, rule = res.get("best"), rule_from_meta(meta)
    seeds, controls = seed_lines(res["org"], res["rows"]), control_lines(res["org"], res["rows"], rule)
    if seeds:
        out += ["**Seeds** (mean ± sd over a row's repetitions, each from its own train subsample):", "", *seeds, ""]
    if controls:
        out += ["**Does locating matter?** (the located edits beside the same edit at the lowest-ranked and at a "
                "random place of the same ranking):", "", *controls, ""]
    out.append(f"Exported: **{best}** ({rule.describe()}), as a reload-verified checkpoint and a sparse patch."
               if best else f"No weight edit passed the export rule ({rule.describe()}), so nothing was exported.")
    pngs = sorted(p.name for p in fig.glob("*.png"))
    if pngs:
        out += ["", "**Figures** (interactive HTML beside each PNG in `figures/`):", ""]
        out += [f"![{Path(p).stem}](figures/{p})" for p in pngs]
    else:  # the run had no Chromium to render PNGs: link the interactive figures
        htmls = sorted(p.name for p in fig.glob("*.html"))
        if htmls:
            out += ["", "**Figures** (interactive HTML; this run had no Chromium, so no PNGs): "
                    + ", ".join(f"[{Path(p).stem}](figures/{p})" for p in htmls)]
    out += ["", END]
    return "\n".join(out)


def replace_block(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def current_block(readme: str) -> str:
    return BEGIN + readme.split(BEGIN, 1)[1].split(END, 1)[0] + END


def slim(src: Path, dst: Path, keep: int = 50) -> None:
    """A large locate result cut to its top ``keep`` labels, no per-prompt scores and only small extras
    (the README shows the top 5 and a few extras; the full results stay in the run folder)."""
    sys.path.insert(0, str(ROOT))
    from bias_lens.locate.result import LocateResult

    r = LocateResult.load(src)
    # small results keep every label in their own order (extras such as per_sample_argmax index them)
    idx = list(range(len(r.labels))) if len(r.labels) <= 500 else r.order()[:keep]
    extras = {k: v for k, v in r.extras.items() if not hasattr(v, "__len__") or isinstance(v, str) or len(v) <= 200}
    LocateResult(r.method, [r.labels[i] for i in idx], r.scores[idx], variant=r.variant, extras=extras,
                 ascending=r.ascending, model=r.model, n_samples=r.n_samples).save(dst)


def copy_run(run: Path, fig: Path = FIG) -> None:
    """Copy a run's results, report, locate results and figures into ``fig`` (replacing them)."""
    if not (run / "results.json").exists():
        raise SystemExit(f"{run} has no results.json; pass the output folder of `bias-lens run`")
    fig.mkdir(exist_ok=True)
    shutil.copy2(run / "results.json", fig / "results.json")
    # report.md sits beside its figures here (in the run folder they are under figures/)
    (fig / "report.md").write_text((run / "report.md").read_text().replace("](figures/", "]("))
    if (fig / "locate").exists():
        shutil.rmtree(fig / "locate")
    (fig / "locate").mkdir()
    for f in sorted((run / "locate").glob("*.json")):
        if "method" in json.loads(f.read_text()):
            slim(f, fig / "locate" / f.name)
        else:  # the circuit graph (small)
            shutil.copy2(f, fig / "locate" / f.name)
    made = {f.name for f in (run / "figures").iterdir() if f.is_file()}
    for f in fig.iterdir():  # figures of an earlier run that this one did not write (e.g. PNGs without Chromium)
        if f.is_file() and f.suffix in (".html", ".png") and f.name not in made:
            f.unlink()
    for f in (run / "figures").iterdir():
        if f.is_file():
            shutil.copy2(f, fig / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, help="output folder of `bias-lens run` to copy into figures/")
    ap.add_argument("--check", action="store_true", help="only check README's block against figures/")
    args = ap.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if args.check:
        ok = current_block(readme) == render()
        print("README results block matches figures/results.json" if ok else "README results block is stale")
        raise SystemExit(0 if ok else 1)
    if args.run is None:
        ap.error("give RUN_DIR or --check")
    copy_run(args.run)
    readme_path.write_text(replace_block(readme, render()))


if __name__ == "__main__":
    main()
