"""Models the benchmarks run on: the embedded SmolLM2-135M, or random-initialised Llama configs of a
given size built from a config (no download), all with SmolLM2's tokenizer.

Sizes (parameters with tied embeddings): ``tiny`` (a 2-layer, d_model 64 test config), ``135m``
(SmolLM2-135M's own config), ``360m`` (SmolLM2-360M's shape), ``1b`` (Llama-3.2-1B's shape:
d_model 2048, 16 layers, 128,256-token vocabulary). Token ids from SmolLM2's 49,152-token
tokenizer are valid in every one of them.
"""

from __future__ import annotations

import torch

#: config overrides per size, on top of SmolLM2-135M's own LlamaConfig
SIZES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "135m": {},
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
}


def tokenizer():
    """SmolLM2's tokenizer (from the embedded checkpoint, offline)."""
    from transformers import AutoTokenizer

    from bias_lens.loading import embedded_checkpoint

    return AutoTokenizer.from_pretrained(embedded_checkpoint())


def random_llama(size: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A random-initialised Llama of ``size`` (see :data:`SIZES`) as a ``LensModel``; nothing downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bias_lens.lens import LensModel
    from bias_lens.loading import embedded_checkpoint

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    cfg = AutoConfig.from_pretrained(embedded_checkpoint())
    for k, v in SIZES[size].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    return LensModel(model, tokenizer(), name=f"random-llama-{size}")


def load(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``smollm2`` (the embedded trained model) or ``random-<size>`` (:func:`random_llama`)."""
    if name == "smollm2":
        from bias_lens import load_model

        return load_model("smollm2-135m", device=device, dtype=dtype)
    if name.startswith("random-"):
        return random_llama(name.removeprefix("random-"), dtype=dtype, device=device)
    raise ValueError(f"model must be 'smollm2' or 'random-<size>' with size in {', '.join(SIZES)}; got {name!r}")


def n_params(lm) -> int:
    """Parameters of the HF model (tied embeddings counted once)."""
    return sum(p.numel() for p in lm.hf.parameters())
