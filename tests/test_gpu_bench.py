"""benchmarks/gpu.py: its no-CUDA exit, and its whole code path on CPU (``--device cpu --tiny``):
the case list, the ratios it writes, and the CPU benchmark's JSON schema."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu  # noqa: E402
from harness import flop_counts  # noqa: E402
from models import random_llama  # noqa: E402

from bias_lens.benchmarks import sample_prompts  # noqa: E402

#: the tiny config's cases (2 layers, d_mlp 128, 4 heads): what run.py covers, named for this model
TINY_ROWS = [
    "layer_scale", "bmi", "layer_scale_and_bmi (one pass)", "neuron_attribution (all 256 neurons)",
    "module_scale final=False (per ablation)", "module_scale final=True (per ablation)",
    "row_scale L1.mlp.down", "neuron_scale L1.mlp.down", "row_scale L1.attn.o", "neuron_scale L1.attn.o",
    "attn_value_attribution (all value neurons)", "query_neurons (10 value neurons)", "bias_trace (per restoration)",
    "  layer_scale vs FLOP bound", "  layer_scale_and_bmi (one pass) vs FLOP bound",
    "naive TL run_with_cache, no filter, per prompt", "  speed-up of layer_scale vs it",
    "naive nnsight trace per prompt, all layers", "  speed-up of layer_scale vs it",
    "masked_finetune 1 step (neuron mask)", "optimizer state (numel)",
]


def test_no_cuda_exits_2_with_one_message(tmp_path):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--out-dir", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, env=env, check=False, timeout=300)
    assert res.returncode == gpu.NO_CUDA == 2
    assert res.stderr.strip().splitlines()[-1] == gpu.NO_CUDA_MESSAGE
    assert not list(tmp_path.iterdir())  # nothing written


def test_no_cuda_in_process(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out-dir", str(tmp_path)]) == 2
    assert gpu.NO_CUDA_MESSAGE in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    threads = torch.get_num_threads()
    assert gpu.main(["--device", "cpu", "--tiny", "--threads", "1", "--out-dir", str(out)]) == 0
    # run in-process, it must leave the caller's grad mode and thread count as they were
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads
    return json.loads((out / "gpu_random-tiny.json").read_text())


def test_tiny_run_has_the_cpu_benchmarks_schema(tiny_report):
    cpu = json.loads((BENCH / "results.json").read_text())  # written by benchmarks/run.py
    assert set(tiny_report) == set(cpu)
    assert all(set(r) == set(cpu["rows"][0]) for r in tiny_report["rows"])
    assert set(cpu["machine"]) - {"load_average_end"} <= set(tiny_report["machine"])
    assert tiny_report["machine"]["dtype"] == "bfloat16" and tiny_report["machine"]["device"] == "cpu"


def test_tiny_run_covers_every_case_and_none_failed(tiny_report):
    rows = tiny_report["rows"]
    assert [r["name"] for r in rows] == TINY_ROWS
    assert all(math.isfinite(r["seconds"]) and "failed" not in r["note"] for r in rows)
    # the naive anchors compute the layer score's numbers (bf16 model, float32 lens)
    assert max(tiny_report["extra"]["anchor_max_abs_diff"].values()) < 1e-4


def test_tiny_run_ratios_are_seconds_over_their_floor(tiny_report):
    floors, extra = tiny_report["floors"], tiny_report["extra"]
    lm = random_llama("tiny", dtype=torch.bfloat16)
    fc = flop_counts(lm, sample_prompts("genbiaseval", "train", gpu.TINY["n"], seed=0))
    assert extra["flops"] == fc
    assert floors["flop bound (layer score)"] == pytest.approx(floors["forward"] * fc["bound_ratio"], rel=1e-12)
    per = {"module_scale": extra["module_scan"]["n_ablations"],
           "bias_trace": extra["trace"]["restorations"] / extra["trace"]["n_items"]}
    checked = 0
    for r in tiny_report["rows"]:
        base = r["floor"].rsplit(" x", 1)[0]  # "forward@4 x18": the floor x per-unit count
        if base in floors:
            p = next((v for k, v in per.items() if r["name"].startswith(k)), 1.0)
            assert r["ratio"] == pytest.approx(r["seconds"] / (p * floors[base]), rel=1e-9), r["name"]
            checked += 1
        if r["target"] is not None:
            assert r["met"] == (r["ratio"] <= r["target"] if r["better"] == "lower" else r["ratio"] >= r["target"])
    assert checked == len(TINY_ROWS) - 3  # all but the two speed-ups and the optimizer state
    state = extra["finetune"]
    assert state["optimizer_state_numel"] == 2 * state["mask_entries"]
