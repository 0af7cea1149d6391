"""Measure local contrastive editing on SmolLM2 (docs/contrastive.md, docs/contrastive_results.json).

    python scripts/measure_contrastive.py --out docs/contrastive_results.json --figure docs/contrastive_sweep

1. The references (``ReferenceConfig()``, the library default; trained once, then read from the
   cache): their dev / test bias beside the base's (the margin between them).
2. The mask difference (share of block-matrix entries, per matrix) and the value difference.
3. The alpha sweep on *dev* only (GenBiasEval-heldout dev: 6 seen templates x dev professions;
   perplexity on the edits' retention pool, sentences 196-255, disjoint from the ``retention`` suite the test measures): every
   localisation x mode, the literal no-transfer readings (anti, and stereo with negative alpha),
   pruning and mask switching, and the random control at every alpha.
4. Per series, alpha chosen on dev: the lowest dev AFGB-r whose dev pronoun mass >= 0.9 x base,
   dev perplexity <= 1.05 x base and GenHintEval dev UB >= base - 0.05; those rows and their controls measured on the test splits
   (``LIMITS``: GenBiasEval test 256 and its 3 held-out templates, GenHintEval 128, retention 80,
   StereoSet 96, MMLU 1 per subject, CommonWords test).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bias_lens import load_model
from bias_lens.benchmarks import evaluate, load_split
from bias_lens.benchmarks.external import GUARD_SENTENCES, retention_texts
from bias_lens.benchmarks.metrics import afgb_t, mass_t
from bias_lens.edit.contrastive import (
    contrastive_edit, difference_by_matrix, mask_diff, mask_fraction, random_like, value_diff,
)
from bias_lens.edit.imp import ReferenceConfig
from bias_lens.edit.measure import dev_probs, dev_ub, retention_perplexity
from bias_lens.edit.references import as_model, make_references, weight_names
from bias_lens.pipeline.measure import measure

LIMITS = {"genbiaseval": 256, "genbiaseval-heldout": None, "genhinteval": 128, "retention": 80, "stereoset": 96, "mmlu": 1}
DEV_SUITE = "genbiaseval-heldout"
DEV_PPL = slice(GUARD_SENTENCES - 60, GUARD_SENTENCES)  # the last 60 of the edits' pool
UB_TOLERANCE = 0.05  # dev UB may fall at most this much (the project's HintAnchor.ub_tolerance)
KEYS = ("afgb_renorm", "mass", "afgb_renorm_heldout", "mass_heldout", "ub", "perplexity", "ss", "lms", "mmlu",
        "cw_bias_renorm", "cw_mass", "afgb")


def log(rec: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)


def dev_score(lm, stereoset: bool = False) -> dict[str, float]:
    """Dev AFGB-r, mass and signed stereotype gap (mean sign(s) (q_he - q_she)); GenHintEval dev UB; dev perplexity."""
    dev = load_split(DEV_SUITE, "dev")
    p = dev_probs(lm, [s["prompt"] for s in dev])
    q = p / p.sum(-1, keepdim=True)
    sign = torch.tensor([(s["s"] > 0) - (s["s"] < 0) for s in dev], dtype=torch.float64)
    out = {"dev_afgb_renorm": float(afgb_t(p, renorm=True)), "dev_mass": float(mass_t(p)),
           "dev_signed": float((sign * (q[:, 0] - q[:, 1])).sum() / sign.abs().sum()),
           "dev_ub": dev_ub(lm, load_split("genhinteval", "dev")),
           "dev_perplexity": retention_perplexity(lm, retention_texts(GUARD_SENTENCES)[DEV_PPL])}
    if stereoset:
        out["dev_ss"] = float(evaluate(lm, "stereoset", "dev").metrics["ss"])
    return out


def test_score(lm, bias_only: bool = False) -> dict[str, float]:
    """The test columns (``LIMITS``) plus CommonWords' renormalised bias and mass."""
    limits = {k: v for k, v in LIMITS.items() if not bias_only or k not in ("mmlu", "genhinteval")}
    out = measure(lm, limits)
    cw = evaluate(lm, "commonwords", "test").metrics
    return {**out, "cw_bias_renorm": float(cw["bias_renorm"]), "cw_mass": float(cw["mass"])}


def references_margin(lm, refs) -> dict[str, dict]:
    """Dev and test bias of the base and of each reference subnetwork (the margin between them)."""
    out = {}
    for side in refs.subnets:
        model = as_model(lm, refs[side])
        out[side] = {**dev_score(model, stereoset=True), **test_score(model, bias_only=True),
                     "sparsity": refs[side].sparsity}
        log({"row": f"reference {side}", **out[side]})
        del model
    return out


def series_masks(lm, refs, k1pct: int) -> dict[str, object]:
    """The located masks: mask difference, value difference at its size, and at 1% of the matrices."""
    differ = mask_diff(refs["stereo"], refs["anti"])
    out = {"mask_diff": differ, "value_diff": value_diff(refs["stereo"], refs["anti"], differ.size)}
    if differ.size < k1pct // 2:
        out["value_diff_1pct"] = value_diff(refs["stereo"], refs["anti"], k1pct)
    return out


def point(lm, refs, where, series: str, mode: str, alpha: float, *, control: bool = False, reference: str = "anti",
          transfer: bool = True) -> dict:
    """One dev sweep point: the edit applied, scored on dev, undone."""
    source = refs["anti" if reference == "stereo" else "stereo"] if transfer else None
    edit = contrastive_edit(lm, refs[reference], where, mode, alpha=alpha, source=source)
    n_weights = int(sum(edit.changed_counts(lm.hf).values()))  # before applying: entries whose value changes
    with edit.applied(lm):
        rec = {"series": series, "mode": mode, "alpha": alpha, "control": control, "reference": reference,
               "transfer": transfer, "n_weights": n_weights, "n_written": edit.size, **dev_score(lm)}
    log(rec)
    return rec


def sweep(lm, refs, masks: dict, alphas: list[float], seed: int) -> tuple[list[dict], dict]:
    """Every series over ``alphas`` (modes by the alpha range) and its random control; literal readings."""
    shapes = {n: tuple(p.shape) for n, p in lm.hf.named_parameters()}
    controls = {name: random_like(m, shapes, seed=seed, exclude=m) for name, m in masks.items()}
    rows = []
    for name, m in masks.items():
        for a in alphas:
            mode = "interpolate" if 0 <= a <= 1 else "extrapolate"
            rows.append(point(lm, refs, m, name, mode, a))
            rows.append(point(lm, refs, controls[name], name, mode, a, control=True))
    md = masks["mask_diff"]
    rows += [point(lm, refs, md, "mask_diff", mode, 1.0) for mode in ("prune", "mask_switch")]
    rows += [point(lm, refs, md, "mask_diff literal (anti)", "interpolate" if a <= 1 else "extrapolate", a,
                   transfer=False) for a in (0.5, 1.0, 2.0)]
    rows += [point(lm, refs, md, "mask_diff literal (stereo, negative alpha)", "extrapolate", a, reference="stereo",
                   transfer=False) for a in (-0.5, -1.0, -2.0)]
    return rows, controls


def choose(rows: list[dict], org: dict) -> dict[tuple, dict]:
    """Per (series, mode kind), the dev-best located row within the dev guards."""
    ok = [r for r in rows if not r["control"] and r["dev_mass"] >= 0.9 * org["dev_mass"]
          and r["dev_perplexity"] <= 1.05 * org["dev_perplexity"] and r["dev_ub"] >= org["dev_ub"] - UB_TOLERANCE]
    best: dict[tuple, dict] = {}
    for r in ok:
        key = (r["series"], r["mode"] if r["mode"] in ("prune", "mask_switch") else "alpha")
        if key not in best or r["dev_afgb_renorm"] < best[key]["dev_afgb_renorm"]:
            best[key] = r
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/contrastive_results.json")
    ap.add_argument("--figure", default="docs/contrastive_sweep")
    ap.add_argument("--alphas", default="-2,0.5,1,1.25,1.5,2,3,4,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", default=None,
                    help="CDA sources of the references (default: cda.DEFAULT_SOURCES; 'professions,winobias,stereoset,hints' = "
                    "with the shared GenHintEval anchor)")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of an existing --out file")
    ap.add_argument("--figure-only", action="store_true", help="redraw --figure from an existing --out file")
    ap.add_argument("--shuffled-controls", action="store_true",
                    help="add the magnitude-matched controls of the --out file's located test rows (and dev points)")
    args = ap.parse_args()
    if args.table or args.figure_only:
        with open(args.out) as f:
            res = json.load(f)
        print(tables(res)) if args.table else figure(res, args.figure)
        return
    torch.set_num_threads(1)
    if args.shuffled_controls:
        return shuffled_controls(args)
    t0 = time.time()
    lm = load_model("smollm2-135m")
    refs = make_references(lm, reference_config(args))
    total = sum(p.numel() for n, p in lm.hf.named_parameters() if n in set(weight_names(lm)))
    org = {"row": "Org", **dev_score(lm, stereoset=True), **test_score(lm)}
    log(org)
    margin = references_margin(lm, refs)
    masks = series_masks(lm, refs, total // 100)
    info = {name: {"size": m.size, "fraction": mask_fraction(m, lm)} for name, m in masks.items()}
    by_matrix = {f"L{k[0]}.{k[1]}": v for k, v in difference_by_matrix(masks["mask_diff"], lm).items()}
    log({"row": "masks", **{f"{k}_fraction": v["fraction"] for k, v in info.items()}})
    rows, controls = sweep(lm, refs, masks, [float(a) for a in args.alphas.split(",")], args.seed)
    tests = []
    for (series, _), r in sorted(choose(rows, org).items()):
        where = masks.get(series, masks["mask_diff"])
        for control in ((False, True) if series in controls and r["mode"] not in ("prune", "mask_switch") else (False,)):
            edit = contrastive_edit(lm, refs[r["reference"]], controls[series] if control else where, r["mode"],
                                    alpha=r["alpha"], source=refs["stereo"] if r["transfer"] else None)
            n_weights = int(sum(edit.changed_counts(lm.hf).values()))  # before applying
            with edit.applied(lm):
                rec = {**{k: r[k] for k in ("series", "mode", "alpha", "reference", "transfer")}, "control": control,
                       "n_weights": n_weights, "n_written": edit.size, **test_score(lm)}
            log(rec)
            tests.append(rec)
    res = {"org": org, "references": margin, "reference_config": refs.config, "reference_info": refs.info,
           "masks": info, "mask_diff_by_matrix": by_matrix, "n_block_entries": total, "sweep": rows, "test": tests,
           "limits": LIMITS, "dev": {"suite": DEV_SUITE, "perplexity_sentences": [DEV_PPL.start, DEV_PPL.stop]},
           "seconds": round(time.time() - t0)}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    if args.figure:
        figure(res, args.figure)


def reference_config(args) -> ReferenceConfig:
    """The library default, with ``--sources`` when given."""
    return ReferenceConfig(sources=tuple(args.sources.split(","))) if args.sources else ReferenceConfig()


def shuffled_controls(args) -> None:
    """Per located test row: the same updates, shuffled within each matrix, at the random control's
    entries (:func:`~bias_lens.edit.contrastive.shuffled_update`), on dev and test; appended to ``--out``."""
    from bias_lens.edit.contrastive import shuffled_update

    with open(args.out) as f:
        res = json.load(f)
    lm = load_model("smollm2-135m")
    refs = make_references(lm, reference_config(args))
    masks = series_masks(lm, refs, res["n_block_entries"] // 100)
    shapes = {n: tuple(p.shape) for n, p in lm.hf.named_parameters()}
    for r in [r for r in res["test"] if not r["control"] and r["series"] in masks and r["mode"] in ("interpolate", "extrapolate")]:
        m = masks[r["series"]]
        edit = contrastive_edit(lm, refs["anti"], m, r["mode"], alpha=r["alpha"], source=refs["stereo"])
        ctl = shuffled_update(lm, edit, random_like(m, shapes, seed=args.seed, exclude=m), seed=args.seed)
        n_weights = int(sum(ctl.changed_counts(lm.hf).values()))
        with ctl.applied(lm):
            dev = dev_score(lm)
            rec = {**{k: r[k] for k in ("series", "mode", "alpha", "reference", "transfer")}, "control": "shuffled",
                   "n_weights": n_weights, "n_written": ctl.size, **test_score(lm)}
        log(rec)
        res["sweep"].append({**{k: rec[k] for k in ("series", "mode", "alpha", "control", "reference", "transfer",
                                                      "n_weights", "n_written")}, **dev})
        res["test"].append(rec)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


COLS = (("afgb_renorm", "AFGB-r", 3), ("mass", "mass", 3), ("afgb_renorm_heldout", "AFGB-r held-out", 3),
        ("mass_heldout", "mass held-out", 3), ("ub", "UB", 3), ("perplexity", "PPL", 2), ("ss", "SS", 1),
        ("lms", "LMS", 1), ("mmlu", "MMLU", 3), ("cw_bias_renorm", "CW bias-r", 3), ("cw_mass", "CW mass", 3))


def _row(label: str, r: dict, org: dict, n: int | None, total: int) -> str:
    cells = []
    for key, _, digits in COLS:
        v = r.get(key)
        cell = "–" if v is None else f"{v:.{digits}f}"
        if key in ("afgb_renorm", "afgb_renorm_heldout", "cw_bias_renorm") and v is not None and key in org:
            cell += f" ({100 * (v - org[key]) / org[key]:+.0f}%)"
        cells.append(cell)
    size = "–" if n is None else f"{n:,} ({100 * n / total:.3f}%)"
    return f"| {label} | " + " | ".join(cells) + f" | {size} |"


def tables(res: dict) -> str:
    """The test table (Org, references, the dev-chosen rows and their random controls) in markdown."""
    org, total = res["org"], res["n_block_entries"]
    head = "| row | " + " | ".join(c[1] for c in COLS) + " | weights edited |"
    lines = [head, "|" + "---|" * (len(COLS) + 2), _row("Org (SmolLM2)", org, org, None, total)]
    for side, r in res["references"].items():
        lines.append(_row(f"reference: {side} (IMP subnetwork, sparsity {r['sparsity']:.2f})", r, org, None, total))
    for r in res["test"]:
        what = r["mode"] if r["mode"] in ("prune", "mask_switch") else f"{r['mode']} alpha {r['alpha']:g}"
        kind = {True: "control: random entries, as ", "shuffled": "control: same updates shuffled to random entries, as "}
        label = f"{kind.get(r['control'], '')}{r['series']}, {what}"
        lines.append(_row(label, r, org, r["n_weights"], total))
    return "\n".join(lines)


def figure(res: dict, path: str) -> None:
    """The alpha-sweep figure of the transfer series (dev), located vs random."""
    from bias_lens.plot.contrastive import alpha_sweep
    from bias_lens.plot.io import write_figure

    from bias_lens.plot.contrastive import PANELS

    rows = [{"series": r["series"], "control": r["control"], "alpha": r["alpha"], "afgb_renorm": r["dev_afgb_renorm"],
             "mass": r["dev_mass"], "perplexity": r["dev_perplexity"], "ub": r["dev_ub"]}
            for r in res["sweep"] if r["transfer"] and r["mode"] in ("interpolate", "extrapolate")
            and r["control"] in (False, True)]
    org = res["org"]
    base = {"afgb_renorm": org["dev_afgb_renorm"], "mass": org["dev_mass"], "perplexity": org["dev_perplexity"],
            "ub": org["dev_ub"]}
    panels = (*PANELS, ("ub", "UB (GenHintEval dev)"))  # the hint-use cost that decides alpha under the UB guard
    write_figure(alpha_sweep(rows, base, panels=panels), path,
                 png=None, plotlyjs="cdn")


if __name__ == "__main__":
    main()
