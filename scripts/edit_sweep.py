"""Reproduce the edit table of docs/edit.md on SmolLM2 + GenBiasEval (seeds fixed, subsampled).

    python scripts/edit_sweep.py --rows org,pb,module,neuron --out-jsonl /tmp/edit_rows.jsonl

Every row is one :class:`bias_lens.pipeline.plan.EditPlan` run by
:func:`bias_lens.pipeline.driver.apply_plan` (train: 128 seeded samples, dev: 64 for early
stopping, test: a fixed-seed ``--limit`` (200) subset, UB: 100 GenHintEval samples, retention: 48
sentences); the unedited metrics are measured once and reused. The module scale uses MSME's
module of SmolLM2, ``L29.mlp.down`` (the top FFN down projection of the module scan), unless
``--module-json`` gives a saved ``module_scale`` result; the other scales use the driver's
locators. ``--set ROW.FIELD=VALUE`` overrides a field of a row's method variant. Each finished row
is appended to ``--out-jsonl`` so partial sweeps survive; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import torch

from bias_lens.edit.methods import Contrastive, Finetune, FullFinetune, HintAnchor, Masking, Prompt
from bias_lens.locate.result import LocateResult
from bias_lens.pipeline.driver import apply_plan
from bias_lens.pipeline.measure import measure
from bias_lens.pipeline.plan import EditPlan, Where

N_TRAIN, SEED = 128, 0
#: SmolLM2's module-scale target (skips the slow zero-ablation scan on 2 CPU cores)
MODULE = "L29.mlp.down"
T = dict(dev_limit=64, retention_limit=48)
ROWS: dict[str, EditPlan] = {
    "fpft": EditPlan(FullFinetune(lr=1e-5, epochs=1, eval_every=2, patience=4, **T)),
    "pb": EditPlan(Prompt()),
    # masked fine-tuning at each scale (msme_literal: see docs/edit.md for why not msme_align)
    "layer": EditPlan(Finetune(lr=1e-5, eval_every=2, patience=4, **T), Where("layer", 1)),
    "module": EditPlan(Finetune(lr=1e-4, eval_every=1, patience=8, **T), Where("module", 1)),
    "module_align": EditPlan(Finetune(loss="msme_align", lr=1e-4, **T), Where("module", 1)),
    "module_lftf": EditPlan(Finetune(paper="lftf", lr=1e-4, eval_every=1, patience=8, **T), Where("module", 1)),
    "module_gap": EditPlan(Finetune(loss="gap", lr=1e-4, eval_every=1, patience=8, **T), Where("module", 1)),
    "row": EditPlan(Finetune(lr=1e-3, eval_every=2, patience=4, **T), Where("row", 4)),
    "neuron": EditPlan(Finetune(lr=1e-3, eval_every=1, patience=8, **T), Where("neuron", 4096)),
    # neuron masking of the top attribution neurons (general neurons filtered out)
    "attribution_mask": EditPlan(Masking(), Where("attribution", 8)),
    # local contrastive editing (docs/contrastive.md): CDA references + IMP, every block matrix searched
    "contrastive": EditPlan(Contrastive()),
}


def _override(plan: EditPlan, sets: list[str], name: str) -> EditPlan:
    """Apply ``--set ROW.FIELD=VALUE`` (JSON values; plain strings such as a loss name as-is).

    ``hint_anchor=true`` turns the UB anchor on; ``hint_loss`` / ``hint_weight`` / ``hint_ub_tolerance``
    set its fields; every other FIELD is a field of the row's method variant."""
    over, hint = {}, {}
    for s in sets:
        key, val = s.split("=", 1)
        row, fld = key.split(".", 1)
        if row != name:
            continue
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        if fld.startswith("hint_"):
            hint[fld[len("hint_"):]] = v
        else:
            over[fld] = v
    if hint.pop("anchor", False) or hint:
        over["hint"] = HintAnchor(**hint)
    return dataclasses.replace(plan, method=dataclasses.replace(plan.method, **over)) if over else plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--out-jsonl", default="edit_rows.jsonl")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--no-org", action="store_true", help="do not re-measure the unedited model (another run did)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--module-json", default=None, help=f"a saved module_scale LocateResult (default: {MODULE})")
    ap.add_argument("--set", action="append", default=[], metavar="ROW.FIELD=VALUE", help="override a method field")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from bias_lens.lens import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    limits = {"genbiaseval": args.limit, "genhinteval": 100, "retention": 48}
    module = LocateResult.load(args.module_json) if args.module_json else \
        LocateResult("fixed", [MODULE], torch.ones(1), variant="MSME's module (no scan)")
    before = {} if args.no_org else measure(lm, limits)
    if before:
        _append(args.out_jsonl, {"row": "org", "after": before, "n_changed": 0, "mask_size": 0})
    for name in [r for r in args.rows.split(",") if r in ROWS]:
        plan = dataclasses.replace(_override(ROWS[name], args.set, name), n_samples=N_TRAIN, seed=SEED, name=name)
        t = time.time()
        run = apply_plan(lm, plan, module if plan.scale == "module" else None, limits=limits, before=before or None)
        if run.handle is not None:
            run.handle.undo()
        rec = run.record
        _append(args.out_jsonl, {"row": name, "plan": rec.plan, "after": rec.metrics, "before": rec.before,
                                 "n_changed": rec.n_changed, "mask_size": rec.cost_p, "labels": rec.labels[:8],
                                 "status": rec.info.get("status"), "best_step": rec.info.get("best_step"),
                                 "history": rec.info.get("history"), "seconds": round(time.time() - t, 1)})
        logging.info("%s: %s", name, {k: round(v, 4) for k, v in rec.metrics.items()})
    with open(args.out_jsonl) as fh:
        print(table([json.loads(line) for line in fh if line.strip()]))


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")


def table(recs: list[dict]) -> str:
    """Markdown table of the rows (last record per row name wins); needs an ``org`` row."""
    recs = list({r["row"]: r for r in recs}.values())
    b = next(r for r in recs if r["row"] == "org")["after"]
    head = "| row | AFGB | FBS | UB | perplexity | probe acc. | Cost-P | changed | AFGB change |\n|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in recs:
        a = r["after"]
        cut = 1 - a["afgb"] / b["afgb"]
        lines.append(f"| {r['row']} | {a['afgb']:.4f} | {a['fbs']:.4f} | {a['ub']:.4f} | {a['perplexity']:.1f} | "
                     f"{a['probe_accuracy']:.3f} | {r['mask_size']} | {r['n_changed']} | {-cut:+.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
