#!/usr/bin/env python
"""Generate ``notebooks/*.ipynb`` from the Python cell lists in this file.

The notebooks are written with nbformat from the ``NB01`` .. ``NB04`` cell lists below, so a review
reads plain Python/markdown diffs here, and the committed ``.ipynb`` files are reproducible:
outputs and execution counts stripped, deterministic cell ids, a fixed kernelspec.
Every notebook runs top to bottom on the embedded SmolLM2-135M on CPU and ends its key cells
with ``assert``s against an independent recomputation (the test suite executes them:
``tests/test_notebooks.py``).

Usage::

    python scripts/make_notebooks.py            # (re)write every notebook
    python scripts/make_notebooks.py --check    # exit 1 if a committed notebook is stale
    python scripts/make_notebooks.py --only 03  # only notebooks whose name starts with 03
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A v4.5 notebook with stripped outputs and deterministic cell ids ``{name-prefix}-{i}``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    prefix = name.split("_", 1)[0]
    for i, (kind, src) in enumerate(cells):
        src = textwrap.dedent(src).strip("\n")
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        cell["id"] = f"nb{prefix}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- cells
def md(text: str) -> tuple[str, str]:
    return ("md", text)


def py(text: str) -> tuple[str, str]:
    return ("code", text)


SETUP = py("""
    import time

    import torch

    from bias_lens.benchmarks import load_split, sample_prompts
    from bias_lens.lens import load_model
    from bias_lens.plot.notebook import setup_notebook

    # figures show in JupyterLab and in an exported HTML (plotly.js embedded once, no CDN needed)
    renderer = setup_notebook()

    torch.manual_seed(0)
    t_start = time.time()
    lm = load_model("smollm2-135m")  # the embedded SmolLM2-135M-Instruct; lm.hf holds the real weights
    print(lm, "| plotly renderer:", renderer)
""")

# ----------------------------------------------------------------------------- 01
NB01 = [
    md("""
    # 01 · Logit lens and BMI: which layers carry the bias?

    Layer-scale locating on the embedded SmolLM2-135M with the two layer scores of the seed papers:

    * **MSME** (*Mitigating Social bias via Multi-Scale Model Editing*), Eq. 2: with the logit lens
      $p^{(i)} = \\mathrm{softmax}(W_U\\,\\mathrm{FinalNorm}(H^{(i)}))$ at the prompt's last token,
      $I(L_i) = |p^{(i+1)}[he] - p^{(i)}[he]| + |p^{(i+1)}[she] - p^{(i)}[she]|$, the change block *i*
      makes to the pronoun probabilities;
    * **LFTF** (*Locate First, Then Fine-tune*), Eq. 4: the block modification intensity
      $\\mathrm{BMI}_i = 1 - \\cos(H^{(i)}_l, H^{(i+1)}_l)$, averaged over positions *l* and prompts.

    Every score is checked against a recomputation from plain Hugging Face hidden states.
    Runs in well under a minute on CPU.
    """),
    SETUP,
    md("""
    ## Prompts

    32 GenBiasEval train prompts drawn with seed 0; the targets are *he* and *she* (single tokens).
    """),
    py("""
    from bias_lens.targets import resolve_targets

    torch.set_grad_enabled(False)  # nothing in this notebook needs gradients
    prompts = sample_prompts("genbiaseval", "train", n=32, seed=0)
    ts = resolve_targets(lm.tokenizer, "he,she")
    HE, SHE = ts.first_ids
    prompts[:4]
    """),
    md("""
    ## Layer scale (MSME Eq. 2)

    `layer_scale` runs one batched forward pass whose hooks keep only each block's last-token
    residual, applies the final norm exactly once to each raw residual $H^{(0)} \\dots H^{(L)}$
    (`norm="recompute"`, the literal reading) and scores every block per prompt.
    """),
    py("""
    from bias_lens.locate.layers import layer_scale

    layer = layer_scale(lm, prompts, ts, progress=True)  # progress=True: a bar while it runs
    print(layer.variant, "| top layers:", layer.top(5))
    print("prompts whose largest change is at each layer:", dict(zip(layer.labels, layer.extras["per_sample_argmax"])))
    """),
    md("""
    **Check against plain transformers.** `output_hidden_states` returns the embedding output and
    the raw output of blocks 0..L-2, but its *last* entry has the final norm already applied (a known
    trap: normalising it again would be wrong). So the oracle applies the final norm + unembedding to
    entries 0..L-1 and only the unembedding to entry L. Then: the last lens layer equals the model's
    own output distribution, and Eq. 2 recomputed from these probabilities equals the library's
    per-prompt matrix.
    """),
    py("""
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)  # right padding
    last = enc["attention_mask"].sum(1) - 1
    rows = torch.arange(len(prompts))
    out = lm.hf(**enc, output_hidden_states=True)
    hs = [h[rows, last] for h in out.hidden_states]  # L + 1 entries, last-token slices
    logits = [lm.unembed(lm.final_norm(h)) for h in hs[:-1]] + [lm.unembed(hs[-1])]
    p = torch.stack([torch.softmax(z.double(), -1)[:, [HE, SHE]] for z in logits])  # [L+1, prompt, 2]
    model_p = torch.softmax(out.logits[rows, last].double(), -1)[:, [HE, SHE]]
    assert torch.allclose(p[-1], model_p, atol=1e-6)  # logit lens at the last layer == model output

    eq2 = (p[1:] - p[:-1]).abs().sum(-1).T  # [prompt, layer]
    print("max |Eq. 2 oracle - library|:", float((eq2 - layer.per_prompt).abs().max()))
    assert torch.allclose(eq2, layer.per_prompt.double(), atol=1e-5)
    """),
    md("""
    ## Figures (MSME Fig. 3)

    Per-prompt heatmap, the mean over prompts, and for each layer the number of prompts whose
    largest change happens there (the paper's "layer 35 is top for 147 of 200 prompts").
    """),
    py("""
    from bias_lens.plot.locate import layer_figure

    layer_figure(layer).show()
    """),
    md("""
    ## Final-norm mode and lenses

    `norm="cached"` divides every layer's residual by the RMS scale of the *final* residual (the
    scale the model really applies) instead of recomputing it per layer: it agrees at the last
    layer and differs in the early layers, where residual norms are much smaller. The same pass
    also runs through nnsight (`lens="nnsight"`) and must give the same numbers as the PyTorch hooks.
    """),
    py("""
    import plotly.graph_objects as go

    cached = layer_scale(lm, prompts, ts, norm="cached")
    go.Figure([
        go.Scatter(x=layer.labels, y=layer.scores.tolist(), name="norm=recompute (default)"),
        go.Scatter(x=cached.labels, y=cached.scores.tolist(), name="norm=cached"),
    ]).update_layout(title="MSME Eq. 2, mean over prompts, two final-norm readings", xaxis_title="layer",
                     yaxis_title="I(L_i)").show()
    # both readings give the same p^(L), the model's own output distribution
    assert torch.allclose(torch.tensor(cached.extras["p_targets"][-1]), torch.tensor(layer.extras["p_targets"][-1]), atol=1e-9)

    via_nnsight = layer_scale(lm, prompts, ts, lens="nnsight")
    print("max |hf - nnsight|:", float((via_nnsight.per_prompt - layer.per_prompt).abs().max()))
    assert torch.allclose(via_nnsight.per_prompt, layer.per_prompt, atol=1e-6)
    """),
    md("""
    ## BMI (LFTF Eq. 4)

    $\\mathrm{BMI}_i = 1 - \\cos(H^{(i)}_l, H^{(i+1)}_l)$ at every real token position *l*, averaged
    over positions, then over prompts. Cosines are computed inside the hooks, so no residual stack is
    kept. Check: recompute it from the raw block inputs/outputs captured by plain forward hooks.
    """),
    py("""
    from bias_lens.locate.layers import bmi
    from bias_lens.plot.locate import bmi_figure

    block_bmi = bmi(lm, prompts, progress=True)
    print("blocks ranked by BMI:", block_bmi.top(5))

    io = {}


    def keep_io(i):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            io[i] = (x, out[0] if isinstance(out, tuple) else out)
        return hook


    hooks = [blk.register_forward_hook(keep_io(i), with_kwargs=True) for i, blk in enumerate(lm.layers)]
    try:
        lm.hf(**enc)
    finally:
        for h in hooks:
            h.remove()
    real = enc["attention_mask"].double()
    oracle = torch.stack([
        ((1 - torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)) * real).sum(1) / real.sum(1)
        for x, y in (io[i] for i in range(lm.n_layers))
    ], 1).mean(0)
    print("max |BMI oracle - library|:", float((oracle - block_bmi.scores).abs().max()))
    assert torch.allclose(oracle, block_bmi.scores.double(), atol=1e-6)
    """),
    md("""
    ## BMI robustness (LFTF appendix A.1)

    The paper repeats BMI on 5 seeds × 100 samples and reports the per-block variance. Here 3 seeds ×
    16 prompts from a pool of 48 (each distinct prompt is run once); error bars are ±1 std across
    seeds. Check: seed 0's row equals `bmi` on exactly the prompts seed 0 draws.
    """),
    py("""
    import random

    from bias_lens.locate.layers import bmi_robustness

    pool = sample_prompts("genbiaseval", "train", n=48, seed=1)
    rob = bmi_robustness(lm, pool, seeds=(0, 1, 2), n=16)
    print(f"mean variance {rob.extras['mean_variance']:.2e} | top-1 block agreement {rob.extras['top1_agreement']:.2f}",
          "| Kendall tau per seed", [round(t, 3) for t in rob.extras["kendall_tau"]])
    bmi_figure(block_bmi, rob).show()
    seed0 = bmi(lm, [pool[i] for i in random.Random(0).sample(range(len(pool)), 16)])
    assert torch.allclose(torch.tensor(rob.extras["per_seed"][0], dtype=torch.float64), seed0.scores.double(), atol=1e-9)
    """),
    md("""
    ## Reading the two scores together

    Eq. 2 measures what each block does to the *pronoun* probabilities at the last token; BMI
    measures how much a block rewrites the residual stream anywhere, bias or not. The papers use the
    first to pick layers to edit (MSME) and the second to pick blocks to fine-tune (LFTF).
    """),
    py("""
    import pandas as pd

    table = pd.DataFrame({"layer": layer.labels, "Eq. 2 (mean)": layer.scores.tolist(),
                          "argmax prompts": layer.extras["per_sample_argmax"], "BMI": block_bmi.scores.tolist()})
    print("top-5 by Eq. 2:", layer.top_labels(5), "| top-5 by BMI:", block_bmi.top_labels(5))
    print(f"notebook ran in {time.time() - t_start:.0f} s")
    table.sort_values("Eq. 2 (mean)", ascending=False).head(8)
    """),
]

# ----------------------------------------------------------------------------- 02
NB02 = [
    md("""
    # 02 · Module, row and neuron (entry) scale

    The finer scales of MSME (*Mitigating Social bias via Multi-Scale Model Editing*) on the
    embedded SmolLM2-135M:

    * **module** (Eq. 3): zero all parameters of one module $M$ of block *i* and measure
      $I(M) = \\sum_{t \\in \\{he, she\\}} |p^{(i+1)}_{w/o\\,M}[t] - p^{(i+1)}[t]|$ at that block's output;
    * **row** (Eq. 4): $I(R_r) = \\cos(\\mathrm{Grad}_{he}[r,:], \\mathrm{Grad}_{she}[r,:])$ with
      $\\mathrm{Grad}_t = \\partial \\sum \\log p(t \\mid \\text{prompt}) / \\partial W$;
    * **neuron / entry** (Eq. 5): within the selected rows, per prompt,
      $I(N_{rc}) = |g_{he}[r,c] - g_{she}[r,c]|$; each row keeps its top column per prompt and the
      union over prompts is the entry set to edit.

    Each score is checked against a direct recomputation. Runs in about a minute on CPU.
    """),
    SETUP,
    py("""
    from bias_lens.targets import resolve_targets

    prompts = sample_prompts("genbiaseval", "train", n=16, seed=0)
    ts = resolve_targets(lm.tokenizer, "he,she")
    HE, SHE = ts.first_ids
    snapshot = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    prompts[:4]
    """),
    md("""
    ## Module scale (MSME Eq. 3)

    All 30 layers × {q, k, v, o, gate, up, down, whole attention, whole MLP}. One baseline pass per
    batch caches every block's input and call arguments; an ablation in block *i* then reruns only
    block *i* (`final=False`; `final=True` also reruns the rest of the model to measure the effect on
    the output). Zeroing happens in place and is always restored in a `finally`. (Zeroing `attn.v`,
    `attn.o` or the whole attention removes the same attention output, so those three tie; likewise
    gate, up, down and the whole MLP.)
    """),
    py("""
    from bias_lens.locate.modules import module_scale
    from bias_lens.plot.locate import module_heatmap

    with torch.no_grad():
        modules = module_scale(lm, prompts, ts, final=False, progress=True)
    module_heatmap(modules).show()
    print("top modules:", modules.top(6))
    assert all(torch.equal(p, snapshot[n]) for n, p in lm.hf.named_parameters())  # weights restored bit-exactly
    """),
    md("""
    **Check the top (single) module by hand:** zero its weight in a copy-and-restore block, run the
    full model with plain `output_hidden_states`, apply the logit lens to that block's output, and
    compare with the unablated run.
    """),
    py("""
    top_module = next(lab for lab in modules.top_labels(20) if lab.split(".", 1)[1] not in ("attn", "mlp"))
    layer_i, kind = int(top_module.split(".")[0][1:]), top_module.split(".", 1)[1]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    rows, last = torch.arange(len(prompts)), enc["attention_mask"].sum(1) - 1


    def block_out_probs():
        h = lm.hf(**enc, output_hidden_states=True).hidden_states[layer_i + 1][rows, last]
        # HF's last hidden state is already final-normed; every other entry is a raw block output
        z = lm.unembed(h) if layer_i + 1 == lm.n_layers else lm.unembed(lm.final_norm(h))
        return torch.softmax(z.double(), -1)[:, [HE, SHE]]


    with torch.no_grad():
        base_p = block_out_probs()
        W = lm.submodule(layer_i, kind).weight
        saved = W.clone()
        try:
            W.zero_()
            ablated_p = block_out_probs()
        finally:
            W.copy_(saved)
    by_hand = float((ablated_p - base_p).abs().sum(-1).mean())
    print(f"{top_module}: by hand {by_hand:.6f}, module_scale {modules.score_of(top_module):.6f}")
    assert abs(by_hand - modules.score_of(top_module)) < 1e-5
    """),
    md("""
    ## Row scale (MSME Eq. 4)

    For the chosen module (MSME edits the down projection of its top layer; here the top MLP
    projection found above), the gradients of $\\sum \\log p(he)$ and $\\sum \\log p(she)$ with respect to
    the weight (HF `[out, in]` orientation) come from one forward and two backward passes, with only
    that weight requiring grad. The paper calls the row cosine the importance and keeps half of the
    rows: `order="descending"` is that literal reading; `order="ascending"` ranks first the rows where
    the two gradients conflict most.
    """),
    py("""
    from bias_lens.locate.gradients import row_scale
    from bias_lens.plot.gradients import row_cosine_histogram, row_cosine_strip

    mlp_modules = [lab for lab in modules.top_labels(len(modules)) if lab.split(".", 1)[1] in ("mlp.gate", "mlp.up", "mlp.down")]
    MODULE = mlp_modules[0]
    rows_res = row_scale(lm, prompts, MODULE, ts, progress=True)
    rows_asc = row_scale(lm, prompts, MODULE, ts, order="ascending")
    print(MODULE, rows_res.variant, "| kept", rows_res.extras["n_selected"], "of", rows_res.extras["n_rows"], "rows")
    print("overlap of the two readings' kept rows:",
          len(set(rows_res.extras["selected_rows"]) & set(rows_asc.extras["selected_rows"])))
    row_cosine_histogram(rows_res).show()
    row_cosine_strip(rows_res).show()
    """),
    md("""
    **Check against direct autograd:** run the whole model through `torch.autograd` the ordinary way
    (plain forward, full log-softmax in the model's float32, gradient of the summed log-probability)
    for each target and take the row cosines. A float64 log-softmax shows how precise the float32
    cosines are: rows whose gradient for one target is tiny move by up to ~1e-2, which can swap
    rows near the keep threshold.
    """),
    py("""
    W = lm.submodule(int(MODULE.split(".")[0][1:]), MODULE.split(".", 1)[1]).weight  # nn.Linear: [out, in]


    def row_cos(dtype):
        grads = []
        for t in (HE, SHE):
            logp = torch.log_softmax(lm.hf(**enc).logits[rows, last].to(dtype), -1)[:, t].sum()
            grads.append(torch.autograd.grad(logp, W)[0].double())
        return torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1)


    cos32, cos64 = row_cos(torch.float32), row_cos(torch.float64)
    print("max |autograd cosine - row_scale|:", float((cos32 - rows_res.scores.double()).abs().max()))
    assert torch.allclose(cos32, rows_res.scores.double(), atol=1e-5)
    kept64 = set(torch.argsort(cos64, descending=True)[: rows_res.extras["n_selected"]].tolist())
    print(f"float64 log-softmax: max cosine change {float((cos64 - cos32).abs().max()):.1e};",
          f"{len(kept64 & set(rows_res.extras['selected_rows']))} of {rows_res.extras['n_selected']} kept rows agree")
    assert all(torch.equal(p, snapshot[n]) for n, p in lm.hf.named_parameters())
    """),
    md("""
    ## Neuron (entry) scale (MSME Eq. 5)

    Within the kept rows, for each prompt, the entry with the largest $|g_{he}[r,c] - g_{she}[r,c]|$
    in each row; the union over prompts is the set of weights to edit (the paper: 1,024 rows → 2,500
    entries on Qwen2.5-Coder-3B). Per-prompt gradients come from the module's input and output
    gradients of the batched pass, never from per-prompt backward passes. The score is the number of
    prompts that chose the entry.
    """),
    py("""
    from bias_lens.locate.gradients import neuron_scale
    from bias_lens.plot.gradients import entry_heatmap

    entries = neuron_scale(lm, prompts, MODULE, ts, rows=rows_res, progress=True)
    print(f"{entries.extras['n_rows']} rows -> {entries.extras['n_entries']} entries; most chosen:", entries.top(5))
    entry_heatmap(entries).show()
    """),
    md("""
    **Check one prompt by hand:** the per-prompt gradient difference from a single-prompt autograd
    pass, and each selected row's argmax column.
    """),
    py("""
    j = 3
    one = lm.tokenizer(prompts[j], return_tensors="pt")
    g = []
    for t in (HE, SHE):
        logp = torch.log_softmax(lm.hf(**one).logits[0, -1], -1)[t]
        g.append(torch.autograd.grad(logp, W)[0].double())
    sel = torch.as_tensor(entries.extras["rows"])
    d = (g[0] - g[1])[sel].abs()
    want, got = d.argmax(1), entries.extras["choices"][j]
    print(f"prompt {j}: {int((want == got).sum())} of {len(sel)} rows pick the same column")
    # equal, or a float tie: the library's column is as large as the best one to 1e-4 relative
    assert bool(((want == got) | (d.gather(1, got[:, None])[:, 0] >= d.max(1).values * (1 - 1e-4))).all())
    """),
    md("""
    **Why so few distinct columns?** The per-prompt gradient of an entry is
    $g[r, c] = \\sum_{pos} \\delta_r[pos]\\, x_c[pos]$ (output gradient times module input), so within a row
    the column with the largest input magnitude tends to win for every prompt. Compare the module
    input's mean |value| per column: on SmolLM2 a few outlier dimensions dominate.
    """),
    py("""
    xs = []
    W_module = lm.submodule(int(MODULE.split(".")[0][1:]), MODULE.split(".", 1)[1])
    hook = W_module.register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach()))
    try:
        with torch.no_grad():
            lm.hf(**enc)
    finally:
        hook.remove()
    real = enc["attention_mask"].bool()
    col_mag = xs[0][real].abs().mean(0)
    chosen = torch.bincount(entries.extras["choices"].flatten(), minlength=col_mag.numel())
    top_col = int(chosen.argmax())
    print(f"most chosen column {top_col}: mean |input| {float(col_mag[top_col]):.3f}",
          f"(rank {int((col_mag > col_mag[top_col]).sum()) + 1} of {col_mag.numel()}, median {float(col_mag.median()):.3f})")
    """),
    md("""
    ## From entries to an edit mask (Cost-P)

    The entry set becomes a parameter mask for the edit layer (notebook 04); its size is the number
    of weights a neuron-scale edit may change, compared with editing the whole module or layer.
    """),
    py("""
    from bias_lens.edit import mask_from_labels, mask_from_result

    entry_mask = mask_from_result(lm.hf, entries, k=None)
    module_mask = mask_from_labels(lm.hf, [MODULE])
    layer_mask = mask_from_labels(lm.hf, [MODULE.split(".")[0]])
    print(f"Cost-P: entries {entry_mask.size:,} | module {module_mask.size:,} | layer {layer_mask.size:,}")
    assert entry_mask.size == entries.extras["n_entries"]
    assert all(torch.equal(p, snapshot[n]) for n, p in lm.hf.named_parameters())
    print(f"notebook ran in {time.time() - t_start:.0f} s")
    """),
]

# ----------------------------------------------------------------------------- 03
NB03 = [
    md("""
    # 03 · Neuron attribution, general neurons and circuits

    The neuron-level view of the *interpretable neuron editing* paper on the embedded SmolLM2-135M:
    score every FFN neuron and attention head by its direct effect on the he/she prediction (neuron
    logit attribution after Yu & Ananiadou), drop the *general neurons* that fire at the start
    position, confirm candidates causally by masking them, and trace the circuit that feeds the top
    bias neuron. Every step ends with a check against an independent recomputation.
    Runs in about a minute on CPU.
    """),
    SETUP,
    md("""
    ## Prompts

    32 GenBiasEval train prompts ("The nurse said that ...", continuations where the model must pick a
    pronoun) drawn with seed 0, and 16 dev prompts kept apart for causal selection. Targets: *he*, *she*.
    """),
    py("""
    from bias_lens.targets import resolve_targets

    torch.set_grad_enabled(False)  # nothing in this notebook needs gradients
    prompts = sample_prompts("genbiaseval", "train", n=32, seed=0)
    dev_prompts = sample_prompts("genbiaseval", "dev", n=16, seed=0)
    ts = resolve_targets(lm.tokenizer, "he,she")
    HE, SHE = ts.first_ids
    prompts[:4]
    """),
    md("""
    ## One cached forward pass

    All attribution scores come from a single batched forward pass that keeps only the last real
    token's residuals, attention `z` and MLP activations (`collect_last`). Check: the cached final
    residual, pushed through the final norm and the unembedding exactly once, reproduces the model's
    own next-token logits from a plain Hugging Face forward pass.
    """),
    py("""
    from bias_lens.locate.attribution import collect_last
    from bias_lens.scoring import iter_batches, last_logits

    cache = collect_last(lm, prompts, progress=True)
    b = next(iter_batches(lm.tokenizer, prompts, len(prompts)))
    ref = last_logits(lm.hf(**b.model_inputs()).logits, b.last)  # plain HF forward; rows sorted by length
    ours = lm.logits_from_resid(cache.final[b.rows].float())
    print("max |logit difference|:", float((ours - ref).abs().max()))
    assert torch.allclose(ours, ref, atol=1e-4)
    """),
    md("""
    ## Neuron logit attribution

    For FFN neuron *k* of layer *l* with last-token activation $m_k$ and value vector $v_k$ (column *k*
    of `down_proj`), the paper's importance for a word *w* is
    $\\mathrm{imp}(w) = \\log p(w \\mid x + m_k v_k) - \\log p(w \\mid x)$, with *x* the residual before
    that MLP and $p = \\mathrm{softmax}(W_U\\,\\mathrm{FinalNorm}(\\cdot))$, the norm's scale cached from
    the model's final residual (as the paper does; `norm="recompute"` is the alternative).
    The bias score is imp(*she*) − imp(*he*): positive pushes towards *she*. Both importances share the
    log-partition function, so the score is a change of the logit difference and all 30 × 1536 neurons
    are scored from the cache, with no forward pass per neuron.
    """),
    py("""
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.plot.attribution import neuron_heatmap

    attr = neuron_attribution(lm, prompts, ts, cache=cache, keep_per_prompt=True)
    signed = attr.extras["signed"]
    table = attr.to_frame().head(10)
    table["signed (she - he)"] = [float(signed[attr.labels.index(lab)]) for lab in table.label]
    print(attr.variant)
    table
    """),
    md("""
    **Brute-force check.** For the five top neurons, add $m_k v_k$ to the cached residual by hand,
    apply the RMSNorm with the cached final scale and a full-vocabulary log-softmax, and compare with
    the library's scores.
    """),
    py("""
    W_U = lm.unembed.weight.double()
    g, eps = lm.final_norm.weight.double(), lm.final_norm.variance_epsilon
    s_final = (cache.final.pow(2).mean(-1, keepdim=True) + eps).sqrt()


    def she_minus_he(resid):
        logp = torch.log_softmax((g * resid / s_final) @ W_U.T, -1)
        return logp[:, SHE] - logp[:, HE]


    for label in attr.top_labels(5):
        l, k = map(int, label[1:].split("N"))
        x, m = cache.resid_mid[l], cache.mlp_post[l][:, k : k + 1]
        v = lm.submodule(l, "mlp.down").weight[:, k].double()
        brute = float((she_minus_he(x + m * v) - she_minus_he(x)).mean())
        lib = float(signed[attr.labels.index(label)])
        print(f"{label}: library {lib:+.5f}   brute force {brute:+.5f}")
        assert abs(brute - lib) < 1e-4
    """),
    py("""
    neuron_heatmap(attr, signed=True, title="Neuron attribution, she - he (strongest neuron per bin)").show()
    """),
    md("""
    ## Attention heads

    The same score for each head: its last-token output through its slice of $W_O$, added to the
    residual before attention. Check: with the cached (linear) final norm, the scores of layer 10's
    nine heads plus its 1536 neurons add up exactly to that layer's total change of the logit
    difference, computed from the residual stream before and after the block.
    """),
    py("""
    from bias_lens.locate.attribution import head_attribution
    from bias_lens.plot.attribution import head_heatmap

    heads = head_attribution(lm, prompts, ts, cache=cache)
    head_heatmap(heads).show()

    l = 10
    r = g * (W_U[SHE] - W_U[HE])
    layer_total = ((cache.resid_pre[l + 1] - cache.resid_pre[l]) @ r) / s_final[:, 0]
    parts = (attr.per_prompt[:, l * lm.d_mlp : (l + 1) * lm.d_mlp].double().sum(1)
             + heads.per_prompt[:, l * lm.n_heads : (l + 1) * lm.n_heads].double().sum(1))
    print("max |heads + neurons - layer total|:", float((parts - layer_total).abs().max()))
    assert torch.allclose(parts, layer_total, atol=1e-3)
    heads.to_frame().head(5)
    """),
    md("""
    ## General neurons at the start position

    The paper finds *general neurons* whose contribution peaks at the `<start>` position and which
    support every ability: editing two of them collapses arithmetic and reading comprehension.
    SmolLM2 adds no BOS token, so position 0 is the first word. `position_stats` records, per neuron,
    the fraction of prompts whose largest |activation| sits at position 0; `filter_general` drops
    neurons where that is a majority; `detect_general` lists neurons whose position-0 activation is
    outsized (> mean + 3 sd of the other positions) in at least 90% of prompts.
    """),
    py("""
    from bias_lens.locate.general_neurons import detect_general, filter_general, position_stats

    stats = position_stats(lm, prompts)
    filtered = filter_general(attr, stats)
    general = detect_general(stats, model=lm.name)
    excluded = filtered.extras["general_excluded"]
    print("position 0 is the", stats.start_token)
    print(len(excluded), "attribution neurons excluded as general, strongest first:", excluded[:5])
    print(len(general), "neurons outsized at position 0:", general.top_labels(5))
    assert len(filtered) + len(excluded) == len(attr)
    assert all(float(stats.argmax0_frac[int(x[1:].split("N")[0]), int(x.split("N")[1])]) >= 0.5 for x in excluded)
    """),
    md("""
    **Check with a plain PyTorch hook.** Tokenise the prompts with the HF tokenizer (right padding),
    capture the input of `down_proj` (the neuron activations) with a forward pre-hook, and recount
    over each prompt's real tokens how often one neuron's largest |activation| is at position 0.
    """),
    py("""
    probe = excluded[0] if excluded else (general.top_labels(1) or attr.top_labels(1))[0]
    l, k = map(int, probe[1:].split("N"))
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    acts = []
    hook = lm.submodule(l, "mlp.down").register_forward_pre_hook(lambda mod, args: acts.append(args[0][:, :, k].abs()))
    try:
        lm.hf(**enc)
    finally:
        hook.remove()
    frac = float((acts[0].masked_fill(~real, -1.0).argmax(1) == 0).double().mean())
    print(f"{probe}: argmax at position 0 in {frac:.3f} of prompts (library {float(stats.argmax0_frac[l, k]):.3f})")
    assert abs(frac - float(stats.argmax0_frac[l, k])) < 1e-9
    """),
    md("""
    **Why filter them?** Mask (activation set to 0 by a temporary hook) the two strongest general
    neurons, then the two strongest *filtered* bias neurons, and compare the perplexity of a few
    general sentences (arithmetic, facts, reading).
    """),
    py("""
    import plotly.graph_objects as go

    from bias_lens.locate.causal import retention
    from bias_lens.locate.general_neurons import masking_effect

    general_top = general.top_labels(2) if len(general) >= 2 else excluded[:2]
    effect = masking_effect(lm, general_top, filtered.top_labels(2), n=2)
    go.Figure(go.Bar(
        x=["nothing masked", f"general {effect['general_neurons']}", f"bias {effect['bias_neurons']}"],
        y=[effect["base"], effect["general"], effect["bias"]],
    )).update_layout(title="Retention perplexity with two neurons masked", yaxis_title="perplexity").show()
    print({k: v for k, v in effect.items()})
    assert retention(lm)[0] == effect["base"]  # the masking hooks were removed
    """),
    md("""
    ## Causal selection

    Attribution is a linear, last-token estimate. Causal selection tests it: mask each candidate
    neuron (activation 0 at every position) on held-out dev prompts, and measure the change of
    AFGB = mean |p(he) − p(she)| (LFTF Eq. 1) and of retention perplexity; keep the top *k* that lower
    AFGB while perplexity rises by less than 5%. Candidates: the 16 strongest general-filtered neurons;
    the batched implementation evaluates all 16 masks in one forward pass.
    """),
    py("""
    from bias_lens.locate.causal import causal_selection

    causal = causal_selection(lm, filtered.top_labels(16), dev_prompts, ts, k=5, progress=True)
    print("dev AFGB unmasked:", round(causal.extras["afgb_base"], 5), "| selected:", causal.extras["selected"])
    go.Figure(go.Bar(
        x=causal.labels, y=causal.scores.tolist(),
        marker_color=["#c0392b" if lab in causal.extras["selected"] else "#95a5a6" for lab in causal.labels],
    )).update_layout(title="Change in dev AFGB when one neuron is masked (red: selected)", yaxis_title="delta AFGB").show()
    causal.to_frame().head(8)
    """),
    md("""
    **Check:** mask the best candidate with a plain neuron-masking hook and recompute AFGB from the
    scorer's probabilities.
    """),
    py("""
    from bias_lens.hooks import mask_neurons
    from bias_lens.scoring import target_probs


    def dev_afgb():
        p = target_probs(lm, dev_prompts, ts)
        return float((p[:, 0] - p[:, 1]).abs().mean())


    best = causal.top_labels(1)[0]
    l, k = map(int, best[1:].split("N"))
    with lm.hooks(mask_neurons({l: [k]})):
        masked = dev_afgb()
    delta = masked - dev_afgb()
    print(f"{best}: delta AFGB recomputed {delta:+.6f}, library {causal.score_of(best):+.6f}")
    assert abs(delta - causal.score_of(best)) < 1e-5
    """),
    md("""
    ## Circuit tracing

    Which upstream components write the top bias neuron's input? With the MLP-input RMSNorm's scale
    frozen at its actual value, the neuron's gate pre-activation is exactly a sum of contributions:
    the embeddings, every earlier attention head (through $W_O$) and every earlier neuron
    ($m_j v_j$). `trace_circuit` keeps the 4 largest by |mean contribution| per node and recurses two
    levels: the "gender neuron circuit" view (red edges raise the input, blue lower it).
    """),
    py("""
    from bias_lens.locate.circuit import trace_circuit, upstream_contributions
    from bias_lens.plot.circuit import circuit_figure

    root = (causal.extras["selected"] or filtered.top_labels(1))[0]
    graph = trace_circuit(lm, root, cache=cache, top_k=4, depth=2)
    circuit_figure(graph).show()
    graph.to_result().to_frame()
    """),
    md("""
    **Check:** the contributions sum to the gate pre-activation that a plain forward hook on
    `gate_proj` records at the last real token of each prompt.
    """),
    py("""
    l, k = map(int, root[1:].split("N"))
    _, contrib, total = upstream_contributions(lm, cache, root)
    last = enc["attention_mask"].sum(1) - 1  # right padding: index of the last real token
    gate = []
    hook = lm.submodule(l, "mlp.gate").register_forward_hook(lambda mod, args, out: gate.append(out[:, :, k]))
    try:
        lm.hf(**enc)
    finally:
        hook.remove()
    gate = gate[0][torch.arange(len(prompts)), last].double()
    print(f"{root}: {contrib.shape[1]} upstream components; max |sum - gate input| = {float((total - gate).abs().max()):.2e}")
    assert torch.allclose(total, gate, atol=1e-3)
    print(f"notebook ran in {time.time() - t_start:.0f} s")
    """),
]

# ----------------------------------------------------------------------------- 04
NB04 = [
    md("""
    # 04 · Edit and export

    Locate → mask → masked fine-tuning → apply → measure → undo → export, on the embedded
    SmolLM2-135M. The edit layer follows the locate-then-edit recipe of MSME (*Mitigating Social bias
    via Multi-Scale Model Editing*) and LFTF (*Locate First, Then Fine-tune*): only the located
    weights change, edits are explicit objects whose `undo()` is bit-exact, and an export is a
    plain Hugging Face checkpoint that reloads without bias_lens. Runs in about a minute and a half
    on CPU.
    """),
    SETUP,
    md("""
    ## Data and a snapshot of the weights

    32 GenBiasEval train samples (prompt plus the real-world ratio `f_he`, `f_she` the MSME loss aims
    at) and 32 dev samples for early stopping, both drawn with seed 0. A copy of every parameter lets
    us check, bit for bit, what each step changed.
    """),
    py("""
    import json
    import random
    import shutil
    import tempfile
    from pathlib import Path

    import plotly.graph_objects as go

    from bias_lens.benchmarks import evaluate
    from bias_lens.targets import resolve_targets

    train = random.Random(0).sample(load_split("genbiaseval", "train"), 32)
    dev = random.Random(0).sample(load_split("genbiaseval", "dev"), 32)
    prompts = [s["prompt"] for s in train]
    ts = resolve_targets(lm.tokenizer, "he,she")
    base = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}


    def changed_entries():
        return {n: int((p != base[n]).sum()) for n, p in lm.hf.named_parameters() if not torch.equal(p, base[n])}


    train[0]
    """),
    md("""
    ## Locate: neuron attribution with the general-neuron filter

    The neuron scores of notebook 03 (interpretable-neuron-editing paper), general neurons removed.
    """),
    py("""
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.locate.general_neurons import filter_general, position_stats

    attr = filter_general(neuron_attribution(lm, prompts, ts), position_stats(lm, prompts))
    attr.to_frame().head(8)
    """),
    md("""
    ## From a locate result to a parameter mask

    `mask_from_result(model, result, k)` turns the top-*k* labels into boolean masks over HF
    parameters. FFN neuron *k* of layer *l* is column *k* of `down_proj` plus row *k* of `gate_proj`
    and `up_proj` (HF `[out, in]` orientation), so each neuron costs 3 × d_model weights; the mask size
    is the papers' Cost-P.
    """),
    py("""
    from bias_lens.edit import mask_from_result

    K = 20
    mask = mask_from_result(lm.hf, attr, k=K)
    print(mask, "\\n", mask.counts())
    assert mask.size == K * 3 * lm.d_model
    """),
    md("""
    ## Bias before editing

    On a fixed 128-sample subset of the GenBiasEval test split: AFGB (LFTF Eq. 1) = mean
    |p(he) − p(she)|, also per prompt scale (word / phrase / sentence), and FBS (MSME) = mean L1
    distance between (p(he), p(she)) and the real-world ratio.
    """),
    py("""
    LIMIT = 128
    KEYS = ["afgb", "afgb_word", "afgb_phrase", "afgb_sentence", "fbs"]
    before = evaluate(lm, "genbiaseval", "test", limit=LIMIT).metrics
    {k: round(before[k], 5) for k in KEYS}
    """),
    md("""
    ## Masked fine-tuning

    Only the masked entries are optimised: a delta vector the size of the mask is added to the
    weights inside `torch.func.functional_call`, so gradients reach nothing else, Adam's state is
    mask-sized, and the model itself is never written during training. The loss is the MSME alignment
    loss: (p(he), p(she)) renormalised over the two targets is pulled towards (f_he, f_she)
    (`loss="msme_literal"` is Eq. 6-8 as written, `loss="lftf"` is LFTF Eq. 5, p(he) + p(she)).
    `FinetuneConfig.for_scale` sets the learning rate per scale; here 8 steps of batch 8, a dev-AFGB
    check every 4 steps (early stopping keeps the best state) and the retention guard.
    """),
    py("""
    from bias_lens.edit.finetune import FinetuneConfig, masked_finetune

    cfg = FinetuneConfig.for_scale("attribution", epochs=2, batch_size=8, max_steps=8, eval_every=4,
                                   dev_limit=32, retention_limit=16)
    ft = masked_finetune(lm, mask, train, dev, cfg, progress=True)
    print(ft.status, "| best step", ft.best_step, "| Adam state entries", ft.optimizer_state_numel, "|", ft.edit)
    go.Figure(go.Scatter(x=[h["step"] for h in ft.history], y=[h["dev_afgb"] for h in ft.history], mode="lines+markers")
              ).update_layout(title="Dev AFGB during masked fine-tuning", xaxis_title="step", yaxis_title="AFGB").show()
    assert changed_entries() == {}  # training never wrote the model
    assert ft.optimizer_state_numel == 2 * mask.size  # Adam: two moments per masked entry, nothing more
    assert set(ft.edit.indices) <= set(mask.names) and ft.edit.size == mask.size
    """),
    md("""
    ## Apply, measure, undo

    `edit.apply_(lm)` writes the new values into the real HF weights in place and returns a handle
    holding only the overwritten originals. Checks: nothing outside the mask changed; after
    `undo()` every parameter is bit-identical to the snapshot and the metrics are exactly the
    ones measured before. (Eight steps on 32 samples is a demonstration, not the tuned pipeline of
    `bias-lens edit`; FBS is measured on raw probabilities while the alignment loss acts on
    probabilities renormalised over he/she, so the two need not move together.)
    """),
    py("""
    handle = ft.edit.apply_(lm)
    after = evaluate(lm, "genbiaseval", "test", limit=LIMIT).metrics
    diff = changed_entries()
    outside = sum(int(((lm.hf.get_parameter(n) != base[n]) & ~mask.masks[n]).sum()) if n in mask.masks else c
                  for n, c in diff.items())
    print("changed entries per tensor:", diff, "| outside the mask:", outside)
    assert outside == 0 and 0 < sum(diff.values()) <= mask.size

    handle.undo()
    assert changed_entries() == {}  # bit-exact
    assert evaluate(lm, "genbiaseval", "test", limit=LIMIT).metrics == before

    go.Figure([go.Bar(name=name, x=KEYS, y=[m[k] for k in KEYS]) for name, m in (("before", before), ("after edit", after))]
              ).update_layout(barmode="group", title=f"GenBiasEval test (n={LIMIT}) before / after the masked edit").show()
    {k: (round(before[k], 5), round(after[k], 5)) for k in KEYS}
    """),
    md("""
    ## Neuron masking: temporary hook vs permanent edit

    The interpretable-neuron-editing paper edits by masking neurons. Setting neuron *k*'s activation
    to 0 (a hook on `L{l}.mlp.post`, for what-if analysis) and zeroing column *k* of `down_proj`
    (a reversible weight edit, for export) are the same function. Check that they give the same
    probabilities and that the edit undoes bit-exactly. The top-10 neurons here are ranked by
    |attribution|, which mixes neurons pushing towards *he* and towards *she*: masking them can
    raise AFGB. Notebook 03's causal selection keeps only neurons whose masking lowers it.
    """),
    py("""
    from bias_lens.edit.neuron_masking import neuron_mask_edit, neuron_mask_hooks
    from bias_lens.scoring import target_probs

    test_prompts = [s["prompt"] for s in load_split("genbiaseval", "test")[:64]]
    neurons = attr.top_labels(10)
    p_base = target_probs(lm, test_prompts, ts)
    with lm.hooks(neuron_mask_hooks(neurons)):
        p_hook = target_probs(lm, test_prompts, ts)
    with neuron_mask_edit(lm.hf, neurons).applied(lm.hf):
        p_edit = target_probs(lm, test_prompts, ts)
    afgb = lambda p: float((p[:, 0] - p[:, 1]).abs().mean())  # noqa: E731
    print(f"AFGB unmasked {afgb(p_base):.5f} | hook {afgb(p_hook):.5f} | weight edit {afgb(p_edit):.5f}")
    print("max |p_hook - p_edit|:", float((p_hook - p_edit).abs().max()))
    assert torch.allclose(p_hook, p_edit, atol=1e-6)
    assert changed_entries() == {}
    """),
    md("""
    ## Export: a verified Hugging Face checkpoint and a sparse patch

    `export_checkpoint` writes config, safetensors weights, tokenizer and `bias_lens_edit.json`
    (base sha256, changed entries per tensor, method, hyper-parameters, seed, metrics before/after)
    into a folder beside the target, reloads it with plain transformers, checks the logits and the
    changed entries, and only then renames it into place. `save_patch` keeps just the indices and
    values of the edit (plus the originals, so it can be reverted).
    """),
    py("""
    from bias_lens.edit.export import export_checkpoint
    from bias_lens.edit.patch import load_patch, save_patch

    out = Path(tempfile.mkdtemp(prefix="bias_lens_nb04_"))
    texts = test_prompts[:4]
    handle = ft.edit.apply_(lm)
    try:
        ckpt = export_checkpoint(lm, out / "edited", method="masked_finetune/attribution", hyperparams=ft.config,
                                 seed=cfg.seed, metrics_before=before, metrics_after=after)
        patch_dir = save_patch(ft.edit, out / "patch", originals=handle.originals, base_name=lm.name)
        with torch.no_grad():
            edited_logits = {t: lm.hf(**lm.tokenizer(t, return_tensors="pt")).logits for t in texts}
    finally:
        handle.undo()
    manifest = json.loads((ckpt / "bias_lens_edit.json").read_text())
    size = lambda d: sum(f.stat().st_size for f in d.iterdir()) / 2**20  # noqa: E731
    print(f"checkpoint {size(ckpt):.0f} MiB, patch {size(patch_dir):.2f} MiB; manifest params: {manifest['params']}")
    assert manifest["n_changed"] == sum(ft.edit.changed_counts(lm.hf).values())
    """),
    md("""
    **Reload with plain transformers** (no bias_lens involved) and compare logits with the in-memory
    edited model: they must be identical. Then apply the saved patch to the base model and compare
    again, and undo for a final bit-exact check.
    """),
    py("""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        for t in texts:
            assert torch.equal(plain(**tok(t, return_tensors="pt")).logits, edited_logits[t]), t

    patch_edit, originals, _ = load_patch(patch_dir)
    with torch.no_grad(), patch_edit.applied(lm.hf):
        for t in texts:
            assert torch.equal(lm.hf(**lm.tokenizer(t, return_tensors="pt")).logits, edited_logits[t]), t
    assert changed_entries() == {}
    del plain
    shutil.rmtree(out)
    print("exported checkpoint and patch reproduce the edited model bit-exactly;",
          f"notebook ran in {time.time() - t_start:.0f} s")
    """),
]

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_logit_lens_and_bmi": NB01,
    "02_module_row_neuron_locating": NB02,
    "03_neuron_attribution_general_neurons_circuits": NB03,
    "04_edit_and_export": NB04,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a notebook on disk differs from the generated one")
    ap.add_argument("--only", default="", help="only notebooks whose file name starts with this")
    ap.add_argument("--out", type=Path, default=NB_DIR, help="output folder (default: notebooks/)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, cells in NOTEBOOKS.items():
        if not name.startswith(args.only):
            continue
        path = args.out / f"{name}.ipynb"
        text = render(build(name, cells))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        write_atomic(path, text)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if stale:
        print(f"stale notebooks (run python scripts/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
