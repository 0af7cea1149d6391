"""``report.md`` and a self-contained ``report.html`` (figures embedded) for the main job."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from .edit_stage import ExportRule

COLUMNS = (  # key, header, format; raw = the papers' literal metrics, -r = renormalised over he/she
    ("fbs_cg", "FBS (CG)", "{:.3f}"), ("fbs", "FBS", "{:.3f}"), ("fbs_renorm", "FBS-r", "{:.3f}"),
    ("afgb", "AFGB", "{:.3f}"), ("afgb_renorm", "AFGB-r", "{:.3f}"), ("mass", "Mass", "{:.3f}"),
    ("afgb_renorm_heldout", "AFGB-r HO", "{:.3f}"),
    ("afgb_word", "AFGB-w", "{:.3f}"), ("afgb_phrase", "AFGB-p", "{:.3f}"), ("afgb_sentence", "AFGB-s", "{:.3f}"),
    ("ub", "UB", "{:.3f}"), ("dama_a_s", "a_s", "{:.3f}"), ("ss", "SS", "{:.1f}"), ("icat", "ICAT", "{:.1f}"), ("crows", "CrowS", "{:.1f}"),
    ("perplexity", "PPL", "{:.2f}"), ("mmlu", "MMLU", "{:.3f}"), ("arithmetic", "Arith", "{:.3f}"),
)
#: what each column is (printed under the table)
LEGEND = ("FBS (CG) = MSME FBS on GenBiasPro-CG; FBS / AFGB = the papers' raw scores on GenBiasEval, FBS-r / "
          "AFGB-r = the same on p(he), p(she) renormalised to sum to 1, Mass = mean p(he) + p(she) (raw scores "
          "also fall when both pronouns fall; an edit that equalises lowers AFGB-r and keeps Mass); AFGB-r HO = AFGB-r "
          "on GenBiasEval's 3 held-out templates x test professions (templates a row trained on 6 of 9 never saw, "
          "professions no row saw); AFGB-w/p/s = raw "
          "AFGB by GenBiasEval scale; UB on GenHintEval; SS/ICAT StereoSet gender test (official labels, mean token "
          "log-prob); CrowS = CrowS-Pairs gender; PPL = perplexity on the gender-neutral corpus; MMLU = 0-shot "
          "accuracy on a per-subject subset of MMLU test; Arith = single-step arithmetic exact match; a_s = DAMA's regression slope on the stereotype score (DAMA test split; 0 = no stereotype); "
          "Cost-P = weights in the edit mask.")


def _fmt(v: Any, f: str) -> str:
    return f.format(v) if isinstance(v, (int, float)) else "–"


def table_rows(org: dict[str, float], rows: list[dict[str, Any]]) -> list[list[str]]:
    """The report table's cells: the unedited model (Org) then one row per edit, formatted."""
    out = [["Org", *[_fmt(org.get(k), f) for k, _, f in COLUMNS], "0"]]
    for r in rows:
        m = r["metrics"]
        out.append([r["name"], *[_fmt(m.get(k), f) for k, _, f in COLUMNS], f"{r['cost_p']:,}"])
    return out


def markdown_table(org: dict[str, float], rows: list[dict[str, Any]]) -> str:
    """The report table as Markdown."""
    head = ["Method", *[h for _, h, _ in COLUMNS], "Cost-P"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(org, rows)]
    return "\n".join(lines)


#: the columns summarised over seed repetitions and beside the controls
SUMMARY = (("afgb_renorm", "AFGB-r"), ("mass", "Mass"), ("afgb_renorm_heldout", "AFGB-r HO"), ("ub", "UB"),
           ("perplexity", "PPL"), ("mmlu", "MMLU"), ("arithmetic", "Arith"))
SEED_MARK = " [seed "


def _mean_sd(values: list[float]) -> str:
    import statistics

    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "–"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def seed_lines(org: dict[str, float], rows: list[dict[str, Any]]) -> list[str]:
    """Rows repeated over seeds (``X``, ``X [seed s]``): mean ± sd (sample sd) of :data:`SUMMARY`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["name"].split(SEED_MARK)[0], []).append(r)
    reps = {k: v for k, v in groups.items() if len(v) > 1}
    if not reps:
        return []
    keys = [(k, h) for k, h in SUMMARY if k in org]
    out = ["| row | seeds | " + " | ".join(h for _, h in keys) + " |", "|---|---:|" + "---|" * len(keys),
           "| Org | – | " + " | ".join(f"{org[k]:.3f}" for k, _ in keys) + " |"]
    for name, rs in reps.items():
        cells = [_mean_sd([float(r["metrics"][k]) for r in rs if k in r["metrics"]]) for k, _ in keys]
        out.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return out


def control_lines(org: dict[str, float], rows: list[dict[str, Any]], rule: Any = None) -> list[str]:
    """Each located row beside its controls (same method and size at the lowest-ranked / a random
    place): the :data:`SUMMARY` columns and whether the row passes the export rule."""
    from .edit_stage import ExportRule, is_control

    rule = rule or ExportRule()
    by_name = {r["name"]: r for r in rows}
    keys = [(k, h) for k, h in SUMMARY if k in org]
    out = ["| row | place | Cost-P | " + " | ".join(h for _, h in keys) + " | passes the export rule |",
           "|---|---|---:|" + "---|" * len(keys) + "---|"]
    shown: set[str] = set()
    for c in (r for r in rows if is_control(r)):
        base = by_name.get(c["name"].split(", ")[0])
        for r, place in ((base, "located"), (c, c["plan"]["where"]["pick"])):
            if r is None or r["name"] in shown:
                continue
            shown.add(r["name"])
            why = "; ".join(rule.failures(org, r)) or "yes"
            out.append(f"| {r['name']} | {place} | {r['cost_p']:,} | "
                       + " | ".join(_fmt(r["metrics"].get(k), "{:.3f}") for k, _ in keys) + f" | {why} |")
    return out if len(out) > 2 else []


def _locate_summary(results: dict[str, Any]) -> list[str]:
    out = []
    for name in ("layer", "layer_cg", "bmi", "module", "row", "row_ascending", "neuron", "attribution",
                 "attribution_filtered", "heads", "general_neurons", "causal"):
        r = results.get(name)
        if r is None:
            continue
        top = ", ".join(f"{lab} ({s:.3g})" for lab, s in r.top(5))
        extra = ""
        if name == "layer" and "per_sample_argmax" in r.extras:
            counts = r.extras["per_sample_argmax"]
            i = max(range(len(counts)), key=counts.__getitem__)
            extra = f"; argmax layer {r.labels[i]} for {counts[i]} of {r.n_samples} prompts"
        if name == "neuron" and "n_entries" in r.extras:
            extra = f"; {r.extras['n_entries']} entries in {r.extras.get('n_rows', '?')} rows (Cost-P)"
        if name == "causal" and "selected" in r.extras:
            extra = f"; {len(r.extras['selected'])} selected"
        out.append(f"- **{name}** ({r.method}, variant `{r.variant}`, n={r.n_samples}): {top}{extra}")
    if "agreement" in results:
        out.append(agreement_line(results["agreement"]))
    return out


def agreement_line(a: dict[str, Any]) -> str:
    """One line: each method's top layer and the Spearman rho of every pair over layers."""
    m, rho = a["methods"], a["spearman"]
    pairs = ", ".join(f"{m[i]}~{m[j]} {rho[i][j]:.2f}" for i in range(len(m)) for j in range(i + 1, len(m)))
    tops = ", ".join(f"{k} L{v}" for k, v in a["top_layer"].items())
    return f"- **agreement over layers** (Spearman of per-layer {a['reduce']} scores): top layers {tops}; {pairs}"


def export_lines(org: dict[str, float], rows: list[dict[str, Any]], best: dict[str, Any] | None,
                 rule: Any = None) -> list[str]:
    """What was exported under ``rule`` (default :class:`~bias_lens.pipeline.edit_stage.ExportRule`)
    and, for every row, why it was not."""
    from .edit_stage import ExportRule

    rule = rule or ExportRule()
    head = f"Export rule: {rule.describe()}."
    if best is not None:
        out = [head, "", f"Exported: **{best['name']}** -> `checkpoint/` (verified by reload) and `patch/` "
               f"({best['n_changed']:,} changed entries)."]
    else:
        out = [head, "", "**No row passed; nothing exported.**"]
    out += ["", "| row | why not exported |", "|---|---|"]
    out += [f"| {r['name']} | {'; '.join(rule.failures(org, r)) or 'passes'} |" for r in rows]
    return out + [""]


def rule_from_meta(meta: dict[str, Any]) -> ExportRule:
    """The export rule a run recorded (runs before it was recorded used ``ExportRule.raw()``)."""
    from .edit_stage import ExportRule

    return ExportRule(**meta["export_rule"]) if "export_rule" in meta else ExportRule.raw()


def write_reports(folder: Path, *, meta: dict[str, Any], evals: dict[str, dict], org: dict[str, float],
                  rows: list[dict[str, Any]], results: dict[str, Any], figures: dict[str, list[str]],
                  best: dict[str, Any] | None, figs_objs: list[tuple[str, Any]]) -> None:
    """Write ``report.md`` and ``report.html`` into ``folder`` (the run's temporary output folder)."""
    from ..io import atomic_write_text

    md = [f"# bias_lens report: {meta['model']}", "",
          f"Command: `{meta['command']}`  ", f"Preset: {'quick' if meta['config']['quick'] else 'full'}; "
          f"cache key `{meta['key']}`; wall time {meta['wall_s']:.0f} s"
          + (" (" + ", ".join(f"{k} {v:.0f} s" for k, v in meta["stage_s"].items()) + ")" if "stage_s" in meta else "")
          + "  ",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
          f"Machine: {meta['machine']}", "",
          "## Data", "", "| suite | split sizes | evaluated (test) |", "|---|---|---|"]
    for s, sz in meta["split_sizes"].items():
        md.append(f"| {s} | {' / '.join(f'{k} {v}' for k, v in sz.items())} | {evals.get(s, {}).get('n', '–')} |")
    md += ["", "## Bias and retention before editing (test splits)", ""]
    for s, e in evals.items():
        md.append(f"- **{s}** (n={e['n']}): " + ", ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items()
                                                           if isinstance(v, (int, float))))
    md += ["", "## Locating", "", *_locate_summary(results), "",
           "## Editing (papers' table layout)", "",
           f"Train: {meta['config']['n_train']} samples of {meta['config']['suite']} train; early stopping on dev; "
           "metrics on test splits (limits: " + json.dumps(meta["config"]["row_limits"]) + "). " + LEGEND, "",
           markdown_table(org, rows), ""]
    seeds, controls = seed_lines(org, rows), control_lines(org, rows, rule_from_meta(meta))
    if seeds:
        md += ["## Seeds (mean ± sd over the repetitions of a row; each draws its own train subsample)", "", *seeds, ""]
    if controls:
        md += ["## Does locating matter? The located edits beside their controls", "",
               "Same method, same size, at the lowest-ranked or a random place of the same ranking.", "",
               *controls, ""]
    md += export_lines(org, rows, best, rule_from_meta(meta))
    md += ["## Figures", ""]
    for name, files in figures.items():
        png = [f for f in files if f.endswith(".png")]
        md.append(f"- [{name}](figures/{files[0]})" + (f"\n\n  ![{name}](figures/{png[0]})" if png else ""))
    atomic_write_text(folder / "report.md", "\n".join(md) + "\n")

    _write_html(folder, meta, org, rows, results, figs_objs)


def _write_html(folder, meta: dict[str, Any], org: dict[str, float], rows: list[dict[str, Any]],
                results: dict[str, Any], figs_objs: list[tuple[str, Any]]) -> None:
    """``report.html``: the edit table, the locate summary and every figure (one plotly.js copy)."""
    from ..io import atomic_write_text
    from ..plot.run import figure_fragments

    body = [f"<h1>bias_lens report: {html.escape(meta['model'])}</h1>",
            f"<p>Command: <code>{html.escape(meta['command'])}</code><br>"
            f"Versions: {html.escape(', '.join(f'{k} {v}' for k, v in meta['versions'].items()))}</p>",
            "<h2>Editing</h2><table border=1 cellpadding=4 style='border-collapse:collapse'><tr>"
            + "".join(f"<th>{h}</th>" for h in ["Method", *[h for _, h, _ in COLUMNS], "Cost-P"]) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(org, rows))
            + "</table>", "<h2>Locating</h2><ul>"
            + "".join(f"<li>{html.escape(line[2:])}</li>" for line in _locate_summary(results)) + "</ul><h2>Figures</h2>"]
    for (name, _), div in zip(figs_objs, figure_fragments(figs_objs)):
        body += [f"<h3>{html.escape(name)}</h3>", div]
    doc = "<!doctype html><html><head><meta charset='utf-8'><title>bias_lens report</title></head><body>" \
          + "\n".join(body) + "</body></html>"
    atomic_write_text(folder / "report.html", doc)
