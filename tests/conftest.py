"""Shared fixtures: tiny random Llama / Qwen2 / GPT-2 (and Gemma / Gemma-2 / Phi-3) models built
from configs, and SmolLM2.

The tiny models use a byte-level BPE tokenizer trained in-process on a small corpus and saved
to a folder (TransformerLens rejects tokenizers that exist only in memory). Sizes are passed to
the config constructors and the parameter count is asserted; biases and norm weights are
perturbed so that bias/norm bugs show; vocab size != d_model.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*deprecated.*")

CORPUS = [
    "The {p} laughed because he was happy .",
    "The {p} laughed because she was happy .",
    "The {p} went home because he was tired .",
    "The {p} went home because she was tired .",
    "The {p} said that they would come , and his friend agreed with her .",
    "The capital of France is Paris . Two plus two is four .",
    "def find_best_{p}s ( {p}s , gender ) : return [ x for x in {p}s if x . gender == 'male' ]",
]
PROFESSIONS = ["nurse", "carpenter", "doctor", "engineer", "teacher", "secretary", "surgeon", "baker"]
D_MODEL = 48
D_MLP = 96
N_LAYERS = 3
N_HEADS = 4


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = [c.format(p=p) for c in CORPUS for p in PROFESSIONS] * 4
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tok")
    _train_tokenizer(folder)
    return folder


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name or "ln" in name.split(".")[-2:][0]:
                if bool(p.any()):
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:  # Gemma's (1 + w) norms start at w = 0
                    p.add_(0.2 * torch.randn(p.shape, generator=g))


def make_config(arch: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, rms_norm_eps=1e-5,
        )
    if arch == "gemma":
        from transformers import GemmaConfig

        return GemmaConfig(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, num_key_value_heads=2, head_dim=D_MODEL // N_HEADS,
            max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )
    if arch == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, num_key_value_heads=2, head_dim=D_MODEL // N_HEADS,
            query_pre_attn_scalar=D_MODEL // N_HEADS, max_position_embeddings=128, sliding_window=4,
            final_logit_softcapping=2.0, attn_logit_softcapping=5.0, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )
    if arch == "phi3":
        from transformers import Phi3Config

        return Phi3Config(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=128,
            original_max_position_embeddings=128, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=D_MODEL, n_inner=D_MLP, n_layer=N_LAYERS, n_head=N_HEADS,
            n_positions=128, bos_token_id=0, eos_token_id=0,
        )
    raise ValueError(arch)


def expected_param_count(arch: str, vocab: int) -> int:
    d, f, n = D_MODEL, D_MLP, N_LAYERS
    if arch == "llama":
        kv = 2 * (d // N_HEADS)
        attn = d * d * 2 + d * kv * 2
        return vocab * d * 2 + n * (attn + 3 * d * f + 2 * d) + d
    if arch == "qwen2":
        kv = 2 * (d // N_HEADS)
        attn = d * d * 2 + d * kv * 2 + d + 2 * kv
        return vocab * d + n * (attn + 3 * d * f + 2 * d) + d
    if arch in ("gemma", "gemma2", "phi3"):
        kv = 2 * (d // N_HEADS)
        attn = d * d * 2 + d * kv * 2  # phi3: one fused qkv [d + 2 kv, d], same count
        norms = {"gemma": 2, "gemma2": 4, "phi3": 2}[arch] * d
        return vocab * d * (2 if arch == "phi3" else 1) + n * (attn + 3 * d * f + norms) + d
    if arch == "gpt2":
        attn = d * 3 * d + 3 * d + d * d + d
        mlp = d * f + f + f * d + d
        return vocab * d + 128 * d + n * (attn + mlp + 4 * d) + 2 * d
    raise ValueError(arch)


def build_tiny(arch: str, tok_dir: Path, tmp: Path, seed: int = 0):
    """A tiny random model of ``arch`` saved to ``tmp`` and loaded as a LensModel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bias_lens.lens import LensModel

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = make_config(arch, len(tok))
    model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(arch, len(tok))
    _perturb_(model, seed)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    model.config._name_or_path = str(tmp)
    return LensModel(model, tok, name=f"tiny-{arch}")


ARCHS = ["llama", "qwen2", "gpt2"]
#: Extra rows with their own tests (tests/test_arch_rows.py); not in ``tiny`` to keep the suite fast.
EXTRA_ARCHS = ["gemma", "gemma2", "phi3"]


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_tokenizer_dir, tmp_path):
    """A fresh tiny model per test, parametrised over architectures."""
    return build_tiny(request.param, tiny_tokenizer_dir, tmp_path / request.param)


@pytest.fixture
def tiny_llama(tiny_tokenizer_dir, tmp_path):
    return build_tiny("llama", tiny_tokenizer_dir, tmp_path / "llama")


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M (shared across the session: treat as read-only or undo edits)."""
    from bias_lens import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny-model tests run single-threaded: torch's thread pool costs far more than it saves on
    48-wide matrices (measured ~1000x per matmul on a loaded 2-core box). Integration tests on
    SmolLM2 keep the default thread count."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    yield from _single_thread()


def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Single-threaded for an integration test of many small forwards (a second intra-op thread cost
    ~10x on a loaded 2-core box, measured)."""
    yield from _single_thread()
