"""Batched greedy generation with stop strings, for the generative capability suites.

Prompts are tokenised with the tokenizer defaults (as :func:`bias_lens.scoring.tokenize`; SmolLM2
adds no BOS), sorted by length and **left**-padded per batch (generation appends on the right;
HF derives position ids from the attention mask, so a padded row's tokens keep positions
``0..n-1``: tested equal to a hand-written unpadded argmax loop). ``lm.hf.generate`` runs with
``do_sample=False`` and ``num_beams=1``; a row stops at EOS, at ``max_new_tokens`` or once its
decoded continuation contains a stop string. The returned text is cut before the first stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..scoring import check_prompts, tokenize


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class _StopOnText:
    """Per-row stopping criterion: the row's new tokens decode to text containing a stop string."""

    def __init__(self, tokenizer: Any, start: int, stop: Sequence[str]):
        self.tokenizer, self.start, self.stop = tokenizer, start, tuple(stop)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


@torch.no_grad()
def greedy_generate(
    lm: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, stop: Sequence[str] = (),
    batch_size: int = 8, progress: bool = False,
) -> list[str]:
    """Greedy continuation text of each prompt (input order), cut at the first stop string."""
    from transformers import StoppingCriteriaList

    prompts = check_prompts(prompts)
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = tokenize(tok, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", leave=False)
    for s in starts:
        rows = order[s : s + batch_size]
        n = max(len(ids[r]) for r in rows)
        inp = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            inp[i, n - len(ids[r]) :] = torch.tensor(ids[r])
            mask[i, n - len(ids[r]) :] = 1
        crit = StoppingCriteriaList([_StopOnText(tok, n, stop)]) if stop else None
        gen = lm.hf.generate(
            input_ids=inp.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad, stopping_criteria=crit,
            temperature=None, top_p=None, top_k=None,
        )
        for i, r in enumerate(rows):
            new = gen[i, n:].tolist()
            if tok.eos_token_id is not None and tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            out[r] = cut_at_stop(tok.decode(new, skip_special_tokens=True), stop)
    return out
