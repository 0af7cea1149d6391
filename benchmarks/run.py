"""On-demand performance benchmark of issue 7 (not part of the pytest run).

One process, one model (the embedded SmolLM2-135M), the same N GenBiasEval train prompts
(``sample_prompts("genbiaseval", "train", N, seed=0)``) for every case. Every locate/edit cost is
reported as a ratio to a floor measured in the same run (absolute seconds are noise on a shared
box; ratios measured side by side are much less so):

* ``forward``: bare batched HF forward over the N prompts, batch 32, no grad, best of 3;
* ``forward@M``: the same over the first M prompts (floor of the module scan, run on fewer prompts);
* ``fwd+bwd@32``: one bare forward+backward of 32 prompts with every parameter requiring grad.

Usage (from the repository root, venv active)::

    python benchmarks/run.py [--n 256] [--threads 1] [--module-n 32] [--anchor-n 32] [--rss-n 1024]
                             [--out benchmarks/results.json] [--profile auto|none|CASE]

Writes the JSON report (atomically) and prints a table. ``--rss-child`` is internal: the peak-RSS
measurement runs in a fresh subprocess so that the parent's allocations do not count.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchors import bare_forward, forward_backward, naive_nnsight_layer_scores, naive_tl_layer_scores  # noqa: E402
from harness import Case, Report, load_average, machine_info, peak_rss_gb, run_cases, time_case, write_report  # noqa: E402

from bias_lens import load_model  # noqa: E402
from bias_lens.benchmarks import load_split, sample_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FT_MODULE = "L29.mlp.down"
MID_ATTN = "L15.attn.o"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="prompts for every case (issue 7: >= 256)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    ap.add_argument("--module-n", type=int, default=32, help="prompts for the module scan (its own floor)")
    ap.add_argument("--anchor-n", type=int, default=32, help="prompts the naive anchors are timed on (scaled to --n)")
    ap.add_argument("--rss-n", type=int, default=1024, help="prompts for the peak-RSS subprocess (0 skips it)")
    ap.add_argument("--repeat", type=int, default=2, help="best of R runs for each locate case")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    ap.add_argument("--profile", default="auto", help="'auto' profiles the worst case vs its target, 'none', or a case name")
    ap.add_argument("--skip", default="", help="comma-separated groups to skip: module,anchors,grad,ft,rss")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.n < 32 or a.module_n < 1 or a.anchor_n < 1 or a.threads < 1:
        ap.error("--n must be >= 32 and --module-n, --anchor-n, --threads >= 1")
    return a


def vm_hwm_gb() -> float | None:
    """Peak RSS of this process image from /proc/self/status (VmHWM, KiB), or None off Linux.

    Unlike ``ru_maxrss`` it is not inherited: Linux folds the parent's high-water mark into the
    child's ``ru_maxrss`` at exec when the child was started with vfork/posix_spawn (what
    :mod:`subprocess` uses), so a child started from this big parent reports the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def rss_child(n: int, threads: int) -> None:
    """Peak RSS of locating over ``n`` prompts (layer scale, BMI, neuron attribution); prints JSON."""
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.locate.layers import bmi, layer_scale

    torch.set_num_threads(threads)
    out: dict = {"n": n}

    def mark(stage: str) -> None:
        out[f"ru_maxrss_{stage}_gb"] = peak_rss_gb()
        hwm = vm_hwm_gb()
        out[f"vmhwm_{stage}_gb"] = None if hwm is None else round(hwm, 3)

    mark("start")
    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaseval", "train", n, seed=0)
    mark("after_load")
    layer_scale(lm, prompts)
    mark("after_layer")
    bmi(lm, prompts)
    mark("after_bmi")
    neuron_attribution(lm, prompts)
    mark("after_attribution")
    out["peak_rss_gb"] = out["vmhwm_after_attribution_gb"] or out["ru_maxrss_after_attribution_gb"]
    print(json.dumps(out))


def measure_rss(n: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", "--rss-n", str(n), "--threads", str(threads)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed (rc {res.returncode}): {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["seconds"] = time.perf_counter() - t
    return out


def profile(fn, path: Path, top: int = 30) -> str:
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).strip_dirs().sort_stats("cumulative")
    st.print_stats(top)
    buf.write("\n--- by own time ---\n")
    st.sort_stats("tottime").print_stats(top)
    path.write_text(buf.getvalue())
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.rss_child:
        rss_child(a.rss_n, a.threads)
        return 0
    logging.basicConfig(level=logging.WARNING)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    torch.set_num_threads(a.threads)
    t_start = time.time()
    machine = machine_info()

    from bias_lens.edit import mask_from_labels
    from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.locate.gradients import neuron_scale, row_scale
    from bias_lens.locate.layers import bmi, layer_scale, layer_scale_and_bmi
    from bias_lens.locate.modules import available_modules, module_scale

    lm = load_model("smollm2-135m")
    prompts = sample_prompts("genbiaseval", "train", a.n, seed=0)
    mod_prompts = prompts[: a.module_n]
    ids = list(lm.tokenizer(" he", add_special_tokens=False).input_ids + lm.tokenizer(" she", add_special_tokens=False).input_ids)
    n_tokens = [len(lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]

    torch.set_grad_enabled(False)
    bare_forward(lm, prompts)  # warm-up
    floors = {
        "forward": time_case(lambda: bare_forward(lm, prompts), 3),
        f"forward@{a.module_n}": time_case(lambda: bare_forward(lm, mod_prompts), 3),
    }
    report = Report(machine, a.n, floors)
    report.extra["mean_prompt_tokens"] = sum(n_tokens) / len(n_tokens)
    report.extra["batch_size"] = 32
    print(f"floor forward x{a.n}: {floors['forward']:.3f}s", flush=True)

    cases = [
        Case("layer_scale", lambda: layer_scale(lm, prompts), 1.5, repeat=a.repeat),
        Case("bmi", lambda: bmi(lm, prompts), 1.5, repeat=a.repeat),
        Case("layer_scale_and_bmi (one pass)", lambda: layer_scale_and_bmi(lm, prompts), 1.5, repeat=a.repeat),
        Case("neuron_attribution (all 46,080 neurons)", lambda: neuron_attribution(lm, prompts), 2.0, repeat=a.repeat),
    ]
    if "module" not in skip:
        n_abl = lm.n_layers * len(available_modules(lm))
        report.extra["module_scan"] = {"n_prompts": a.module_n, "n_ablations": n_abl, "modules": available_modules(lm)}
        for final in (False, True):
            cases.append(Case(f"module_scale final={final} (per ablation)",
                              lambda final=final: module_scale(lm, mod_prompts, final=final), 0.6,
                              floor=f"forward@{a.module_n}", per=n_abl, repeat=1,
                              note=f"{n_abl} ablations on {a.module_n} prompts"))
    if "grad" not in skip:
        for mod in (FT_MODULE, MID_ATTN):
            cases.append(Case(f"row_scale {mod}", lambda mod=mod: row_scale(lm, prompts, mod), 3.5, repeat=a.repeat))
            cases.append(Case(f"neuron_scale {mod}", lambda mod=mod: neuron_scale(lm, prompts, mod), 3.5,
                              repeat=a.repeat, note="rows chosen in the same passes (rows=None)"))
    run_cases(report, cases)

    # ---- naive anchors for the layer score: timed on a subset, scaled per prompt to N
    if "anchors" not in skip:
        sub = prompts[: a.anchor_n]
        ref = layer_scale(lm, sub)
        t_layer = next(r.seconds for r in report.rows if r.name == "layer_scale")
        checks = {}
        for name, fn in (("TL run_with_cache, no filter, per prompt", naive_tl_layer_scores),
                         ("nnsight trace per prompt, all layers", naive_nnsight_layer_scores)):
            got = fn(lm, sub, ids)
            checks[name] = float((got - ref.per_prompt).abs().max())
            s = time_case(lambda fn=fn: fn(lm, sub, ids), 1) * (a.n / len(sub))
            note = f"timed on {len(sub)} prompts, scaled x{a.n / len(sub):g}; max |diff| vs layer_scale {checks[name]:.1e}"
            report.add(f"naive {name}", s, s / floors["forward"], "forward", None, note)
            report.add("  speed-up of layer_scale vs it", t_layer, s / t_layer, "naive / layer_scale", 10.0, better="higher")
            print(report.rows[-2].name, f"{s:.2f}s (scaled)", flush=True)
        report.extra["anchor_max_abs_diff"] = checks

    # ---- one neuron-scale masked fine-tuning step vs a bare forward+backward (batch 32)
    if "ft" not in skip:
        torch.set_grad_enabled(True)
        batch = prompts[:32]
        flags = {n: p.requires_grad for n, p in lm.hf.named_parameters()}
        try:
            for p in lm.hf.parameters():
                p.requires_grad_(True)
            forward_backward(lm, batch, ids)  # warm-up
            report.floors["fwd+bwd@32"] = time_case(lambda: forward_backward(lm, batch, ids), 3)
        finally:
            for n, p in lm.hf.named_parameters():
                p.requires_grad_(flags[n])
        ent = neuron_scale(lm, prompts, FT_MODULE)
        labels = ent.extras["selected"] if len(ent.extras["selected"]) <= 2304 else ent.top_labels(2304)
        mask = mask_from_labels(lm.hf, labels)
        by_prompt = {s["prompt"]: s for s in load_split("genbiaseval", "train", seed=0)}
        train = [by_prompt[p] for p in batch]
        cfg = FinetuneConfig.for_scale("neuron", epochs=1, max_steps=1, batch_size=32)
        holder = {}

        def ft_step():
            holder["res"] = masked_finetune(lm, mask, train, None, cfg, retention=[])

        run_cases(report, [Case("masked_finetune 1 step (neuron mask)", ft_step, 1.3, floor="fwd+bwd@32",
                                repeat=3, note=f"{mask.size} entries of {FT_MODULE}; whole call incl. setup")])
        state = holder["res"].optimizer_state_numel
        full_adam = 2 * sum(p.numel() for p in lm.hf.parameters())
        ok = state <= 2 * mask.size
        report.add("optimizer state (numel)", 0.0, float(state), "2 x mask entries", float(2 * mask.size),
                   note=f"Adam state {state} numbers ({state * 4 / 1024:.1f} KiB) vs {full_adam:,} for full-model Adam")
        report.rows[-1].met = ok
        report.extra["finetune"] = {"mask_entries": mask.size, "optimizer_state_numel": state,
                                    "full_model_adam_state_numel": full_adam, "lr": cfg.lr}
        torch.set_grad_enabled(False)

    # ---- peak RSS over 1,024 prompts in a fresh subprocess
    if "rss" not in skip and a.rss_n:
        rss = measure_rss(a.rss_n, a.threads)
        report.extra["rss"] = rss
        report.add(f"peak RSS GB, locate x{a.rss_n} (subprocess)", rss["seconds"], rss["peak_rss_gb"], "GB (absolute)", 2.5,
                   note=f"VmHWM; after model load {rss['vmhwm_after_load_gb']} GB, after layer+bmi "
                        f"{rss['vmhwm_after_bmi_gb']} GB; layer_scale + bmi + neuron_attribution")

    machine["load_average_end"] = load_average()
    report.extra["wall_seconds"] = time.time() - t_start

    # ---- profile the worst case relative to its target
    if a.profile != "none":
        by_name = {c.name: c for c in cases}
        worst = None
        if a.profile == "auto":
            scored = [(r.ratio / r.target, r.name) for r in report.rows
                      if r.target and r.better == "lower" and r.name in by_name and r.ratio == r.ratio]
            worst = max(scored)[1] if scored else None
        elif a.profile in by_name:
            worst = a.profile
        if worst:
            path = a.out.with_name("profile_" + "".join(ch if ch.isalnum() else "_" for ch in worst) + ".txt")
            txt = profile(by_name[worst].fn, path)
            report.extra["profiled"] = {"case": worst, "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)}
            print(f"\nprofile of {worst} -> {path}\n" + "\n".join(txt.splitlines()[:45]))

    print()
    print(f"machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, torch threads {a.threads}, "
          f"load avg start {machine['load_average_start']} end {machine['load_average_end']}")
    print("floors: " + ", ".join(f"{k} {v:.3f}s" for k, v in report.floors.items()))
    print(report.table())
    write_report(report, a.out)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
