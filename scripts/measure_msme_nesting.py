"""Measure MSME's nested locating against the flat scan on SmolLM2 (docs/msme_nesting.md).

    python scripts/measure_msme_nesting.py [--out docs/msme_nesting.json] [--rows KEY,...] [--resume]
                                           [--n-samples 32] [--cg-limit N] [--gbe-limit N] [--threads 1]
    python scripts/measure_msme_nesting.py --table   # only print docs/msme_nesting.md's table from --out

1. ``n_samples`` seeded GenBiasPro-CG train prompts (``split_samples`` of the plans, seed 0): the
   prompts every scale is located on and every edit is trained on (dev split: early stopping only);
2. located once per (scale, nesting, row order): ``nesting="msme"`` by the driver itself
   (:func:`bias_lens.pipeline.driver.locate`: Eq. 2 layer -> Eq. 3 every matrix of it -> Eq. 4 kept
   rows -> Eq. 5 entries); ``nesting="flat"`` as the driver's flat path ranks it (the top ``mlp.down``
   of the all-layer scan, its top 4 rows / 4,096 entries), with the scan restricted to ``mlp.down``
   and ``final=False`` (the same block scores, tests/test_msme_nesting.py, without the 270-ablation
   final-effect scan the flat locator also records);
3. the unedited model measured once with :func:`bias_lens.pipeline.measure.measure` on GenBiasPro-CG
   test (``--cg-limit``; default: all 1,024) and GenBiasEval test (all 1,026);
4. each row: ``apply_plan`` (no measuring inside), then the same ``measure`` while the edit is applied
   (an edit that changed 0 weights is the unedited model: ``before`` is reused), undo, and the
   weights checked bit-exactly restored. Two rows with the same method and the same located weights
   are the same edit and are measured once.

Rows run in :data:`ROWS` order (MSME's literal loss first) and the JSON is written atomically after
each, so ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from bias_lens import load_model
from bias_lens.edit.methods import Finetune, method_to_dict
from bias_lens.io import atomic_write_text
from bias_lens.locate.gradients import neuron_scale, row_scale
from bias_lens.locate.modules import module_scale
from bias_lens.pipeline.driver import apply_plan, locate, located_labels, split_samples
from bias_lens.pipeline.measure import measure
from bias_lens.pipeline.plan import EditPlan, Where

log = logging.getLogger("measure_msme_nesting")
SUITE = "genbiaspro-cg"
#: shrunk training (the ~25 min CPU budget): 1 epoch of batch 8, dev checks every 2 steps on 32 dev prompts
TRAINING = {"epochs": 1, "batch_size": 8, "eval_every": 2, "patience": 2, "dev_limit": 32, "retention_limit": 16}
METHODS = {
    "literal": Finetune(paper="msme", **TRAINING),  # MSME Eq. 6-8 as written, raw-AFGB early stopping
    "equalising": Finetune(paper="msme", loss="msme_align", mass_weight=1.0, dev_metric="afgb_renorm", mass_floor=0.9,
                           **TRAINING),
}
#: (scale, row order) located; ``None``: the scale ranks no rows
SPOTS = (("module", None), ("row", "descending"), ("neuron", "descending"), ("row", "ascending"))
ROWS = tuple((m, s, o, n) for m, spots in (("literal", SPOTS[:3]), ("equalising", SPOTS[:3]),
                                            ("literal", SPOTS[3:]), ("equalising", SPOTS[3:]))
             for s, o in spots for n in ("msme", "flat"))


def row_key(method: str, scale: str, order: str | None, nesting: str) -> str:
    """``literal/row-ascending/msme``-style row keys."""
    return f"{method}/{scale}{'-' + order if order and scale == 'row' else ''}/{nesting}"


def plan_of(method: str, scale: str, order: str | None, nesting: str, n_samples: int) -> EditPlan:
    """The row's plan: ``METHODS[method]`` at ``Where(scale, nesting=..., row_order=...)``."""
    where = Where(scale, nesting=nesting, **({"row_order": order} if order else {}))
    return EditPlan(METHODS[method], where, suite=SUITE, n_samples=n_samples, name=row_key(method, scale, order, nesting))


def locate_all(lm, n_samples: int) -> tuple[dict, dict]:
    """Every (scale, order, nesting) located result on the train prompts, and the timings."""
    train = split_samples(plan_of("literal", "module", None, "flat", n_samples))[0]
    prompts = [s["prompt"] for s in train]
    out, wall = {}, {}
    for scale, order in SPOTS:
        t = time.perf_counter()
        out[(scale, order, "msme")] = locate(lm, plan_of("literal", scale, order, "msme", n_samples), train)
        wall[f"{scale}-{order}-msme"] = time.perf_counter() - t
    t = time.perf_counter()
    scan = module_scale(lm, prompts, modules=["mlp.down"], final=False)
    top = scan.top_labels(1)[0]
    out[("module", None, "flat")] = scan
    for order in ("descending", "ascending"):
        out[("row", order, "flat")] = row_scale(lm, prompts, top, order=order)
    out[("neuron", "descending", "flat")] = neuron_scale(lm, prompts, top)
    wall["flat"] = time.perf_counter() - t
    return out, wall


def located_summary(plan: EditPlan, res) -> dict:
    """What a row's located result says: the chain (msme) or the flat scan's top, and the edited labels."""
    labels = located_labels(plan, res)
    d = {"method": res.method, "variant": res.variant, "n_labels": len(labels), "first_labels": labels[:8],
         "module": res.extras.get("module", labels[0] if res.method == "module" else None)}
    if "chain" in res.extras:
        d["chain"] = res.extras["chain"]
    elif res.method == "module":
        d["scan_top"] = res.top(5)
    return d


def run_row(lm, plan: EditPlan, located, limits: dict, before: dict) -> dict:
    """One edit: trained by the driver, measured while applied (unless it changed nothing), undone."""
    snap = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    t = time.perf_counter()
    run = apply_plan(lm, plan, located, limits={}, before={})
    try:
        after = measure(lm, limits) if run.record.n_changed > 0 else dict(before)
    finally:
        if run.handle is not None:
            run.handle.undo()
    if not all(torch.equal(p, snap[n]) for n, p in lm.hf.named_parameters()):
        raise RuntimeError(f"{plan.label}: weights not restored bit-exactly after undo")
    rec = run.record
    rec.before, rec.metrics = dict(before), after
    return {"record": rec.to_dict(), "wall_s": time.perf_counter() - t, "restored_bit_exact": True}


COLS = (("fbs_cg", "FBS-CG"), ("fbs_cg_renorm", "FBS-CG-r"), ("mass_cg", "mass-CG"), ("afgb", "AFGB"),
        ("afgb_renorm", "AFGB-r"), ("mass", "mass"))


def table(d: dict) -> str:
    """The Markdown table of a ``--out`` JSON: the unedited model, then every row in run order."""
    head = "| row | edited weights (located) | changed | status (step) | " + " | ".join(c for _, c in COLS) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLS)),
             "| unedited | - | 0 | - | " + " | ".join(f"{d['before'][k]:.4f}" for k, _ in COLS) + " |"]
    for r in d["rows"]:
        rec, info = r["record"], r["record"]["info"]
        where = f"{r['located']['module']} x{r['located']['n_labels']} ({rec['cost_p']:,})"
        status = f"{info.get('status')} ({info.get('best_step')})" + (f", = {r['same_edit_as']}" if "same_edit_as" in r else "")
        lines.append(f"| {r['key']} | {where} | {rec['n_changed']:,} | {status} | "
                     + " | ".join(f"{rec['metrics'][k]:.4f}" for k, _ in COLS) + " |")
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/msme_nesting.json"))
    ap.add_argument("--rows", default=None, help="comma-separated row keys (default: all, in ROWS order)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    ap.add_argument("--n-samples", type=int, default=32, help="GenBiasPro-CG train prompts located and trained on")
    ap.add_argument("--cg-limit", type=int, default=None, help="GenBiasPro-CG test prompts (default: all 1,024)")
    ap.add_argument("--gbe-limit", type=int, default=None, help="GenBiasEval test prompts (default: all 1,026)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only print the Markdown table of --out (no model)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the rows (see the module docstring) and write ``--out``."""
    args = _args(argv)
    if args.table:
        sys.stdout.write(table(json.loads(args.out.read_text())) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    limits = {SUITE: args.cg_limit, "genbiaseval": args.gbe_limit}
    old = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    out = {"command": " ".join(["python", *sys.argv]), "model": lm.name, "threads": args.threads,
           "machine": f"{platform.machine()}, {platform.platform()}", "limits": limits,
           "settings": {"suite": SUITE, "n_samples": args.n_samples, "seed": 0, "training": TRAINING,
                        "methods": {k: method_to_dict(m) for k, m in METHODS.items()}},
           "rows": old.get("rows", []), "timings": old.get("timings", {})}
    wanted = args.rows.split(",") if args.rows else [row_key(*r) for r in ROWS]

    def write() -> None:
        out["timings"]["total_wall_s_this_call"] = time.perf_counter() - t0
        atomic_write_text(args.out, json.dumps(out, indent=1, default=str))

    located, out["timings"]["locate_s"] = locate_all(lm, args.n_samples)
    if "before" in old and old.get("limits") == limits:
        out["before"] = old["before"]
    else:
        t = time.perf_counter()
        out["before"] = measure(lm, limits)
        out["timings"]["before_s"] = time.perf_counter() - t
    write()
    _run_rows(lm, args, located, limits, out, wanted, write)
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - t0)
    return 0


def _run_rows(lm, args, located: dict, limits: dict, out: dict, wanted: list[str], write) -> None:
    """Every wanted row not yet in ``out`` (the same method on the same located weights runs once)."""
    done = {r["key"]: r for r in out["rows"]}
    for method, scale, order, nesting in ROWS:
        key = row_key(method, scale, order, nesting)
        if key not in wanted or key in done:
            continue
        plan = plan_of(method, scale, order, nesting, args.n_samples)
        res = located[(scale, order, nesting)]
        summary = located_summary(plan, res)
        sha = hashlib.sha256("\n".join(sorted(located_labels(plan, res))).encode()).hexdigest()
        same = next((r for r in out["rows"] if r["method"] == method and r["labels_sha256"] == sha), None)
        row = ({**same, "same_edit_as": same["key"]} if same else run_row(lm, plan, res, limits, out["before"]))
        row.update(key=key, method=method, scale=scale, nesting=nesting, row_order=order, located=summary,
                   labels_sha256=sha)
        out["rows"].append(row)
        done[key] = row
        m = row["record"]["metrics"]
        log.info("%s: %d weights changed, fbs_cg %.4f fbs_cg_renorm %.4f mass_cg %.4f afgb %.4f (%.0f s)", key,
                 row["record"]["n_changed"], m["fbs_cg"], m["fbs_cg_renorm"], m["mass_cg"], m["afgb"], row["wall_s"])
        write()


if __name__ == "__main__":
    raise SystemExit(main())
