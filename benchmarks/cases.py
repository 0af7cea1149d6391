"""The benchmark's cases, written once for every benchmark script (`run.py` on CPU, `gpu.py` on one
CUDA device, `scaling.py` over model sizes).

Each builder takes a loaded ``LensModel`` and prompts and returns :class:`harness.Case` lists (or
adds rows to a :class:`harness.Report`). Module names come from the model's depth (last layer's
``mlp.down``, middle layer's ``attn.o``), so the same cases run on SmolLM2 (L29 / L15), a random
1B Llama or a tiny test config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from anchors import bare_forward, forward_backward, naive_nnsight_layer_scores, naive_tl_layer_scores
from harness import Case, Report, flop_counts, run_cases, time_case

#: the FLOP-bound floor of the exact layer score (body + n_layers+1 unembeddings per prompt)
FLOP_FLOOR = "flop bound (layer score)"
#: issue 18: the exact layer score within 1.2x its FLOP bound
FLOP_TARGET = 1.2
LAYER_CASES = ("layer_scale", "layer_scale_and_bmi (one pass)")


def target_ids(lm) -> list[int]:
    """Token ids of " he" and " she" (leading space, as the project scores them)."""
    return [lm.tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" he", " she")]


def probe_modules(lm) -> tuple[str, str]:
    """(last layer's mlp.down, middle layer's attn.o): L29 / L15 on SmolLM2's 30 layers."""
    return f"L{lm.n_layers - 1}.mlp.down", f"L{lm.n_layers // 2}.attn.o"


def add_flop_floor(report: Report, lm, prompts: Sequence[str], batch_size: int = 32) -> dict:
    """Record the FLOP counts and the FLOP-bound floor: forward seconds x (layer-score / forward FLOPs)."""
    fc = flop_counts(lm, prompts, batch_size)
    report.floors[FLOP_FLOOR] = report.floors["forward"] * fc["bound_ratio"]
    report.extra["flops"] = fc
    return fc


def add_bound_rows(report: Report) -> None:
    """A second row for each layer-score case: the same seconds against the FLOP-bound floor."""
    for r in [r for r in report.rows if r.name in LAYER_CASES]:
        report.add(f"  {r.name} vs FLOP bound", r.seconds, r.seconds / report.floors[FLOP_FLOOR], FLOP_FLOOR,
                   FLOP_TARGET, note=f"bound = forward x {report.extra['flops']['bound_ratio']:.3f} (FLOPs)")


def locate_cases(lm, prompts: Sequence[str], repeat: int = 2) -> list[Case]:
    """Layer score, BMI, both in one pass, neuron attribution: each against the bare forward."""
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.locate.layers import bmi, layer_scale, layer_scale_and_bmi

    n_neurons = lm.n_layers * lm.d_mlp
    return [
        Case("layer_scale", lambda: layer_scale(lm, prompts), 1.5, repeat=repeat),
        Case("bmi", lambda: bmi(lm, prompts), 1.5, repeat=repeat),
        Case("layer_scale_and_bmi (one pass)", lambda: layer_scale_and_bmi(lm, prompts), 1.5, repeat=repeat),
        Case(f"neuron_attribution (all {n_neurons:,} neurons)", lambda: neuron_attribution(lm, prompts), 2.0,
             repeat=repeat),
    ]


def module_cases(lm, prompts: Sequence[str], report: Report) -> list[Case]:
    """The module scan (both readings), per ablation, against the forward over the same prompts."""
    from bias_lens.locate.modules import available_modules, module_scale

    n_abl = lm.n_layers * len(available_modules(lm))
    report.extra["module_scan"] = {"n_prompts": len(prompts), "n_ablations": n_abl, "modules": available_modules(lm)}
    return [Case(f"module_scale final={final} (per ablation)", lambda final=final: module_scale(lm, prompts, final=final),
                 0.6, floor=f"forward@{len(prompts)}", per=n_abl, repeat=1,
                 note=f"{n_abl} ablations on {len(prompts)} prompts") for final in (False, True)]


def grad_cases(lm, prompts: Sequence[str], repeat: int = 2) -> list[Case]:
    """Row and neuron gradient scores of the last mlp.down and the middle attn.o."""
    from bias_lens.locate.gradients import neuron_scale, row_scale

    out = []
    for mod in probe_modules(lm):
        out.append(Case(f"row_scale {mod}", lambda mod=mod: row_scale(lm, prompts, mod), 3.5, repeat=repeat))
        out.append(Case(f"neuron_scale {mod}", lambda mod=mod: neuron_scale(lm, prompts, mod), 3.5, repeat=repeat,
                        note="rows chosen in the same passes (rows=None)"))
    return out


def neuron_cases(lm, prompts: Sequence[str], repeat: int = 2, n_value: int = 10) -> list[Case]:
    """Attention value neurons (all of them) and the FFN query neurons of the top ``n_value`` ones."""
    from bias_lens.locate.query_neurons import query_neurons
    from bias_lens.locate.value_neurons import attn_value_attribution, parse_attn_neuron

    top = attn_value_attribution(lm, prompts[:8]).top_labels(4 * n_value)
    units = [lab for lab in top if parse_attn_neuron(lab)[0] > 0][:n_value]
    return [
        Case("attn_value_attribution (all value neurons)", lambda: attn_value_attribution(lm, prompts), None,
             repeat=repeat),
        Case(f"query_neurons ({len(units)} value neurons)", lambda: query_neurons(lm, prompts, units), None,
             repeat=1, note="eager attention (needs the attention probabilities)"),
    ]


def trace_cases(lm, report: Report, n_items: int = 4, n_noise: int = 10) -> list[Case]:
    """Bias tracing of ``n_items`` StereoSet gender items, per (restoration x noise sample).

    Its floor ``forward@trace`` is one bare forward of each item's two sentences x ``n_noise``
    (the corrupted batch rows, once); the ratio is the cost of one restoration relative to it.
    """
    from bias_lens.locate.tracing import bias_trace
    from bias_lens.locate.tracing_data import load_tracing_items, prepare_item

    raw = load_tracing_items("gender", limit=n_items)
    items = [it for it in (prepare_item(lm.tokenizer, r) for r in raw) if it is not None]
    if not items:
        raise ValueError(f"none of the first {n_items} tracing items tokenises for this tokenizer; raise n_items")

    @torch.no_grad()
    def corrupted_rows_once() -> None:  # each item's [anti, stereo] x n_noise rows, one bare forward
        for it in items:
            lm.hf(input_ids=torch.tensor([it.anti_ids, it.stereo_ids], device=lm.device).repeat(n_noise, 1))

    corrupted_rows_once()
    report.floors["forward@trace"] = time_case(corrupted_rows_once, 2)
    comps = ("resid", "mlp", "attn")
    n_specs = sum(1 + len(comps) * lm.n_layers * len(it.anti_ids) for it in items)
    report.extra["trace"] = {"n_items": len(items), "n_noise": n_noise, "restorations": n_specs}
    return [Case("bias_trace (per restoration)", lambda: bias_trace(lm, items, components=comps, n_noise=n_noise),
                 None, floor="forward@trace", per=n_specs / len(items), repeat=1,
                 note=f"{len(items)} items, {n_specs} restorations x {n_noise} noise samples; "
                      "ratio = one restoration vs one bare forward of the same rows")]


def anchor_rows(report: Report, lm, prompts: Sequence[str], anchor_n: int) -> None:
    """The naive per-prompt TL and nnsight layer scores, timed on ``anchor_n`` prompts, scaled to all."""
    from bias_lens.locate.layers import layer_scale

    sub, ids, n = prompts[:anchor_n], target_ids(lm), len(prompts)
    ref = layer_scale(lm, sub)
    t_layer = next(r.seconds for r in report.rows if r.name == "layer_scale")
    checks = {}
    for name, fn in (("TL run_with_cache, no filter, per prompt", naive_tl_layer_scores),
                     ("nnsight trace per prompt, all layers", naive_nnsight_layer_scores)):
        try:
            got = fn(lm, sub, ids)
            checks[name] = float((got.double().cpu() - ref.per_prompt).abs().max())
            s = time_case(lambda fn=fn: fn(lm, sub, ids), 1) * (n / len(sub))
        except Exception as err:  # an anchor's failure must not hide the other numbers
            report.add(f"naive {name}", float("nan"), float("nan"), "forward", None, f"failed: {err!r}")
            continue
        note = f"timed on {len(sub)} prompts, scaled x{n / len(sub):g}; max |diff| vs layer_scale {checks[name]:.1e}"
        report.add(f"naive {name}", s, s / report.floors["forward"], "forward", None, note)
        report.add("  speed-up of layer_scale vs it", t_layer, s / t_layer, "naive / layer_scale", 10.0, better="higher")
    report.extra["anchor_max_abs_diff"] = checks


@contextmanager
def all_params_require_grad(lm) -> Iterator[None]:
    """Every parameter requires grad inside (the fwd+bwd floor's setting); the flags restored after."""
    flags = {n: p.requires_grad for n, p in lm.hf.named_parameters()}
    try:
        for p in lm.hf.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for n, p in lm.hf.named_parameters():
            p.requires_grad_(flags[n])


def ft_case(report: Report, lm, prompts: Sequence[str], batch_n: int = 32) -> Case:
    """One masked fine-tuning step on a neuron mask of the last mlp.down, against a bare fwd+bwd.

    Sets the ``fwd+bwd@{batch_n}`` floor (every parameter requiring grad) and records the mask and
    optimizer-state sizes in ``report.extra["finetune"]`` once the case has run.
    """
    from bias_lens.benchmarks import load_split
    from bias_lens.edit import mask_from_labels
    from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
    from bias_lens.locate.gradients import neuron_scale

    batch, ids = prompts[:batch_n], target_ids(lm)
    floor = f"fwd+bwd@{len(batch)}"
    with all_params_require_grad(lm):
        forward_backward(lm, batch, ids)  # warm-up
        report.floors[floor] = time_case(lambda: forward_backward(lm, batch, ids), 3)
    mod = probe_modules(lm)[0]
    ent = neuron_scale(lm, prompts, mod)
    labels = ent.extras["selected"] if len(ent.extras["selected"]) <= 2304 else ent.top_labels(2304)
    mask = mask_from_labels(lm.hf, labels)
    by_prompt = {s["prompt"]: s for s in load_split("genbiaseval", "train", seed=0)}
    train = [by_prompt[p] for p in batch]
    cfg = FinetuneConfig.for_scale("neuron", epochs=1, max_steps=1, batch_size=len(batch))

    def step() -> None:
        with torch.enable_grad():
            res = masked_finetune(lm, mask, train, None, cfg, retention=[])
        report.extra["finetune"] = {"mask_entries": mask.size, "optimizer_state_numel": res.optimizer_state_numel,
                                    "full_model_adam_state_numel": 2 * sum(p.numel() for p in lm.hf.parameters()),
                                    "lr": cfg.lr}

    return Case("masked_finetune 1 step (neuron mask)", step, 1.3, floor=floor, repeat=3,
                note=f"{mask.size} entries of {mod}; whole call incl. setup")


def add_state_row(report: Report) -> None:
    """The fine-tuning step's Adam state vs 2 x mask entries (no state for untouched weights)."""
    ft = report.extra.get("finetune")
    if not ft:
        return
    state, size = ft["optimizer_state_numel"], ft["mask_entries"]
    report.add("optimizer state (numel)", 0.0, float(state), "2 x mask entries", float(2 * size),
               note=f"Adam state {state} numbers ({state * 4 / 1024:.1f} KiB) vs "
                    f"{ft['full_model_adam_state_numel']:,} for full-model Adam")
    report.rows[-1].met = state <= 2 * size


def guarded(report: Report, name: str, build) -> list[Case]:
    """``build()``'s cases, or none and a NaN row named ``name`` when building them fails."""
    try:
        return build()
    except Exception as err:  # one group's failure must not hide the other numbers
        report.add(name, float("nan"), float("nan"), "forward", None, f"failed while setting up: {err!r}")
        return []


def make_report(lm, prompts: Sequence[str], module_n: int, machine: dict) -> Report:
    """The bare-forward floors (all prompts, the module scan's first ``module_n``), the FLOP bound."""
    bare_forward(lm, prompts)  # warm-up
    floors = {
        "forward": time_case(lambda: bare_forward(lm, prompts), 3),
        f"forward@{module_n}": time_case(lambda: bare_forward(lm, prompts[:module_n]), 3),
    }
    report = Report(machine, len(prompts), floors)
    n_tokens = [len(lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    report.extra["mean_prompt_tokens"] = sum(n_tokens) / len(n_tokens)
    report.extra["batch_size"] = 32
    add_flop_floor(report, lm, prompts)
    return report


def run_groups(report: Report, lm, prompts: Sequence[str], *, repeat: int, module_n: int, anchor_n: int,
               skip: set[str] = frozenset(), trace_items: int = 4, n_noise: int = 10) -> list[Case]:
    """Every case group not in ``skip`` (module, grad, neurons, trace, anchors, ft), timed into
    ``report`` (a failing case becomes a NaN row, the others still run); returns the cases run."""
    cases = locate_cases(lm, prompts, repeat)
    if "module" not in skip:
        cases += module_cases(lm, prompts[:module_n], report)
    if "grad" not in skip:
        cases += grad_cases(lm, prompts, repeat)
    if "neurons" not in skip:
        cases += guarded(report, "neuron cases", lambda: neuron_cases(lm, prompts, repeat))
    if "trace" not in skip:
        cases += guarded(report, "bias_trace", lambda: trace_cases(lm, report, trace_items, n_noise))
    run_cases(report, cases)
    add_bound_rows(report)
    if "anchors" not in skip:
        anchor_rows(report, lm, prompts, anchor_n)
    if "ft" not in skip:
        ft = guarded(report, "masked_finetune 1 step (neuron mask)", lambda: [ft_case(report, lm, prompts)])
        run_cases(report, ft)
        add_state_row(report)
        cases += ft
    return cases
