"""Items for bias tracing: StereoSet sentence pairs with their bias-attribute ("subject") spans.

The data is BiasEdit's ``bias_tracing/data/domain/gender.json`` (shipped as
``data/stereoset/bias_tracing_gender.json``): StereoSet intrasentence gender items, each with the
stereotyped and anti-stereotyped sentence and ``subject``, the bias-attribute words to corrupt
(``["female", "she"]`` in "Under pressure, a female will often show that she is strong.").

:func:`prepare_item` follows BiasEdit's ``make_inputs`` for causal LMs (the literal reading):

* each sentence is tokenised with a BOS token in front (the tokenizer's BOS, or its EOS when it has
  none, as GPT-2's ``<|endoftext|>``); BiasEdit prepends ``bos_token`` for GPT models and relies
  on LLaMA's tokenizer adding it. ``prefix="none"`` tokenises the bare sentence instead;
* an item is skipped (``None``) when a subject word is missing from either sentence or the two
  sentences have different token counts (restorations are indexed by position in both);
* a subject's token span is found by BiasEdit's ``find_token_range``: the first *character*
  occurrence of the word in the decoded tokens (``span="substring"``, literal; so "he" can match
  inside "the"). ``span="word"`` takes the first whole-word occurrence instead. The search runs
  over the sentence tokens after the BOS (BiasEdit also searches the BOS text; no subject word
  occurs in a BOS token's text, so the spans agree).

:func:`embedding_std` is ROME's / BiasEdit's ``collect_embedding_std``: the standard deviation of
all input-embedding entries of a list of texts (BiasEdit: ROME's 1,209 ``knowns.json`` subjects,
shipped as ``data/stereoset/bias_tracing_knowns.json``), each tokenised on its own with the
tokenizer's defaults.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BIASES = ("gender",)
PREFIXES = ("bos", "none")
SPANS = ("substring", "word")


@dataclass(frozen=True)
class TraceItem:
    """One prepared sentence pair: token ids of both sentences (same length) and spans to corrupt."""

    id: str
    subject: tuple[str, ...]
    anti_ids: tuple[int, ...]
    stereo_ids: tuple[int, ...]
    anti_spans: tuple[tuple[int, int], ...]  # [start, end) token ranges, one per subject word
    stereo_spans: tuple[tuple[int, int], ...]
    tokens: tuple[str, ...]  # display tokens (anti/stereo where they differ)
    attr_positions: tuple[int, ...]  # positions where the two sentences differ (the attribute term)

    @property
    def n_tokens(self) -> int:
        """Number of tokens of the (anti-stereotypical) sentence."""
        return len(self.anti_ids)

    def corrupted(self) -> list[int]:
        """Positions corrupted in either sentence (sorted, unique)."""
        return sorted({p for b, e in self.anti_spans + self.stereo_spans for p in range(b, e)})


def _data_file(bias: str) -> Any:
    from ..benchmarks.sources import _read_json

    if bias not in BIASES:
        raise ValueError(f"bias tracing data exists for {', '.join(BIASES)}; got bias={bias!r}")
    return _read_json(f"stereoset/bias_tracing_{bias}.json")


def load_tracing_items(bias: str = "gender", limit: int | None = None) -> list[dict]:
    """The raw BiasEdit tracing items (``id``, ``context``, ``data``, ``subject`` ...), first ``limit``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all), got {limit}")
    data = _data_file(bias)
    return list(data if limit is None else data[:limit])


def knowns() -> list[str]:
    """ROME's known-fact subjects (BiasEdit's ``knowns.json``), the default corpus of :func:`embedding_std`."""
    from ..benchmarks.sources import _read_json

    return list(_read_json("stereoset/bias_tracing_knowns.json"))


def _decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def token_span(tokenizer: Any, ids: Sequence[int], word: str, *, span: str = "substring") -> tuple[int, int] | None:
    """``[start, end)`` token range covering the first occurrence of ``word`` (BiasEdit's ``find_token_range``)."""
    toks = _decode_each(tokenizer, ids)
    whole = "".join(toks)
    if span == "substring":
        char = whole.find(word)
    else:
        m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", whole)
        char = m.start() if m else -1
    if char < 0:
        return None
    loc, start = 0, None
    for i, t in enumerate(toks):
        loc += len(t)
        if start is None and loc > char:
            start = i
        if start is not None and loc >= char + len(word):
            return (start, i + 1)
    return None


def _prefix_ids(tokenizer: Any, prefix: str) -> list[int]:
    if prefix == "none":
        return []
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("prefix='bos' needs a tokenizer with a BOS or EOS token; pass prefix='none'")
    return [int(tid)]


def prepare_item(tokenizer: Any, item: dict, *, prefix: str = "bos", span: str = "substring") -> TraceItem | None:
    """Tokenise one BiasEdit item; ``None`` when BiasEdit would skip it (see the module docstring)."""
    if prefix not in PREFIXES:
        raise ValueError(f"prefix must be one of {PREFIXES}, got {prefix!r}")
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    anti = item["data"]["anti-stereotype"]["sentence"]
    stereo = item["data"]["stereotype"]["sentence"]
    subject = tuple(item["subject"])
    if not subject or any(w not in anti or w not in stereo for w in subject):
        return None
    head = _prefix_ids(tokenizer, prefix)
    a = head + list(tokenizer(anti, add_special_tokens=False)["input_ids"])
    s = head + list(tokenizer(stereo, add_special_tokens=False)["input_ids"])
    if len(a) != len(s) or len(a) < 2:
        return None
    off = len(head)
    spans = []
    for ids in (a, s):
        found = [token_span(tokenizer, ids[off:], w, span=span) for w in subject]
        if any(f is None for f in found):
            return None
        spans.append(tuple((b + off, e + off) for b, e in found))
    ta, ts = _decode_each(tokenizer, a), _decode_each(tokenizer, s)
    tokens = tuple(x if x == y else f"{x}/{y}" for x, y in zip(ta, ts))
    attr = tuple(i for i, (x, y) in enumerate(zip(a, s)) if x != y)
    return TraceItem(str(item.get("id", "")), subject, tuple(a), tuple(s), spans[0], spans[1], tokens, attr)


@torch.no_grad()
def embedding_std(lm: Any, texts: Sequence[str]) -> float:
    """Std of all input-embedding entries of ``texts`` (each tokenised alone, tokenizer defaults)."""
    rows: list[Tensor] = []
    w = lm.embed.weight
    for t in texts:
        ids = lm.tokenizer(t)["input_ids"]
        if ids:
            rows.append(w[torch.as_tensor(ids, device=w.device)].float())
    if not rows:
        raise ValueError("embedding_std needs at least one non-empty text")
    return float(torch.cat(rows).std())


def load_json_items(path: str) -> list[dict]:
    """Items in BiasEdit's format from a JSON file of your own (a list of dicts)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items with data/subject fields")
    return data
