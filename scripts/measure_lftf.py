"""Measure LFTF as written on SmolLM2 (docs/lftf.md): the BMI rank sweep and the ablation table.

    python scripts/measure_lftf.py [--out docs/lftf_results.json] [--rows top,middle,...] [--max-steps N] [--resume]
    python scripts/measure_lftf.py --tables   # only render docs/lftf.md's two tables from --out (no model)

1. BMI (LFTF Eq. 4) on the main job's locate prompts (``sample_prompts(cfg.suite, "train",
   cfg.n_locate, seed=cfg.locate_seed)``, as ``bias_lens.pipeline.runner._locate_stage``);
2. the unedited model measured once on ``cfg.row_limits`` (``before`` of every row);
3. the 7 trainings of :func:`bias_lens.pipeline.lftf_sweep.lftf_rows` with the main job's settings
   (``Finetune(paper="lftf", **FULL_TRAINING)`` at the layer scale's lr, ``cfg.plan(row)``: 128
   seeded GenBiasEval train samples, seed 0), each run by ``apply_plan`` on the block at its BMI
   rank, measured on ``cfg.row_limits``, undone, and the weights checked bit-exactly restored.

The JSON (written atomically after every row, so an interrupted run keeps its finished rows;
``--resume`` skips them) holds the command, the settings, the BMI result and ranking, ``before``,
every row's EditRecord dict and the timings. ``--max-steps`` caps every row's steps (recorded).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from bias_lens import load_model
from bias_lens.benchmarks import sample_prompts
from bias_lens.io import atomic_write_text
from bias_lens.locate.layers import bmi
from bias_lens.locate.result import LocateResult
from bias_lens.pipeline.config import FULL_TRAINING, RunConfig
from bias_lens.pipeline.driver import apply_plan
from bias_lens.pipeline.lftf_sweep import block_at_rank, lftf_rows, lftf_tables, located_at_rank
from bias_lens.pipeline.measure import measure

log = logging.getLogger("measure_lftf")


def _bmi_dict(res: LocateResult, wall: float) -> dict:
    order = res.order()
    return {"method": res.method, "variant": res.variant, "n_samples": res.n_samples, "labels": res.labels,
            "scores": res.scores.tolist(), "ascending": res.ascending,
            "ranking": [res.labels[i] for i in order], "wall_s": wall}


def _bmi_from(d: dict, model: str) -> LocateResult:
    return LocateResult(d["method"], d["labels"], torch.tensor(d["scores"], dtype=torch.float64), variant=d["variant"],
                        ascending=d["ascending"], n_samples=d["n_samples"], model=model)


def _restored(lm, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in lm.hf.named_parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/lftf_results.json"))
    ap.add_argument("--rows", default=None, help="comma-separated row keys (default: all 7)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap on every row's fine-tuning steps")
    ap.add_argument("--resume", action="store_true", help="keep rows already in --out and skip them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tables", action="store_true", help="only print the rank and ablation tables of --out (Markdown)")
    args = ap.parse_args(argv)
    if args.tables:
        sys.stdout.write(lftf_tables(json.loads(args.out.read_text())) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    cfg = RunConfig.full(max_steps=args.max_steps)
    lm = load_model(cfg.model)
    rows = lftf_rows(lm.n_layers, FULL_TRAINING)
    keys = [r.key for r in rows]
    wanted = keys if args.rows is None else args.rows.split(",")
    bad = [k for k in wanted if k not in keys]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {','.join(keys)}")

    old = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    out = {"command": " ".join(["python", *sys.argv]), "model": lm.name, "threads": args.threads,
           "machine": f"{platform.machine()}, {platform.platform()}",
           "settings": {"suite": cfg.suite, "n_locate": cfg.n_locate, "locate_seed": cfg.locate_seed,
                        "n_train": cfg.n_train, "seed": cfg.seed, "training": dict(FULL_TRAINING),
                        "max_steps": cfg.max_steps, "row_limits": cfg.row_limits, "batch_size": cfg.batch_size},
           "rows": [r for r in old.get("rows", []) if r["key"] in wanted], "timings": old.get("timings", {})}
    done = {r["key"] for r in out["rows"]}

    def write() -> None:
        out["timings"]["total_wall_s_this_call"] = time.perf_counter() - t0
        atomic_write_text(args.out, json.dumps(out, indent=1, default=str))

    if "bmi" in old:
        out["bmi"], B = old["bmi"], _bmi_from(old["bmi"], lm.name)
        log.info("BMI reused from %s", args.out)
    else:
        t = time.perf_counter()
        prompts = sample_prompts(cfg.suite, "train", cfg.n_locate, seed=cfg.locate_seed)
        B = bmi(lm, prompts, batch_size=cfg.batch_size)
        out["bmi"] = _bmi_dict(B, time.perf_counter() - t)
        log.info("BMI %.0f s; ranking %s", out["bmi"]["wall_s"], out["bmi"]["ranking"])
    out["blocks"] = {r.key: block_at_rank(B, r.rank) for r in rows}

    if "before" in old:
        out["before"] = old["before"]
    else:
        t = time.perf_counter()
        out["before"] = measure(lm, cfg.row_limits, batch_size=cfg.batch_size)
        out["timings"]["before_s"] = time.perf_counter() - t
        log.info("before measured in %.0f s", out["timings"]["before_s"])
    write()

    snapshot = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    for row in rows:
        if row.key not in wanted or row.key in done:
            continue
        t = time.perf_counter()
        located = located_at_rank(B, row.rank)
        log.info("row %s: block %s (BMI rank %d)", row.key, located.labels[0], row.rank)
        run = apply_plan(lm, cfg.plan(row.plan), located, limits=cfg.row_limits, before=out["before"],
                         batch_size=cfg.batch_size)
        try:
            rec = run.record.to_dict()
        finally:
            if run.handle is not None:
                run.handle.undo()
        restored = _restored(lm, snapshot)
        if not restored:
            raise RuntimeError(f"row {row.key}: weights not restored bit-exactly after undo")
        wall = time.perf_counter() - t
        out["rows"].append({"key": row.key, "rank": row.rank, "block": located.labels[0], "tables": list(row.tables),
                            "wall_s": wall, "restored_bit_exact": restored, "record": rec})
        m = rec["metrics"]
        log.info("row %s done in %.0f s: status %s step %s afgb %.4f afgb_renorm %.4f mass %.4f n_changed %d",
                 row.key, wall, rec["info"].get("status"), rec["info"].get("best_step"), m["afgb"], m["afgb_renorm"],
                 m["mass"], rec["n_changed"])
        write()
    write()
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
