"""Target words (``he``/``she``, ``his``/``her``, any list) resolved to token ids in context.

A target is scored as the *continuation* of a prompt, so it is tokenised in its leading-space
form after a context: the ids are the suffix of ``tokenize(context + " " + word)`` beyond
``tokenize(context)``. Single-token targets are the fast path; multi-token targets are scored by
summing their tokens' log-probs (teacher-forced) — never cut to their first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_CONTEXT = "The person said that"


class TargetError(ValueError):
    """A target word cannot be scored (empty, or not representable in the vocabulary)."""


@dataclass(frozen=True)
class TargetSet:
    """Words with their in-context token ids and, optionally, a real-world distribution.

    ``distribution[i]`` is the real-world share of word i (e.g. f_he = (1+f)/2); used by FBS-style
    metrics. ``leading_space`` records which form was resolved.
    """

    words: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    leading_space: bool = True

    def __post_init__(self) -> None:
        if len(self.words) < 2:
            raise TargetError(f"a target set needs two or more words, got {list(self.words)}")
        if len(self.words) != len(self.token_ids):
            raise TargetError("words and token_ids must align")

    @property
    def single_token(self) -> bool:
        """True when every target word is one token."""
        return all(len(t) == 1 for t in self.token_ids)

    @property
    def first_ids(self) -> list[int]:
        """The first token id of each target word."""
        return [t[0] for t in self.token_ids]

    def __len__(self) -> int:
        return len(self.words)

    def require(self, *, n: int | None = None, single_token: bool = False) -> "TargetSet":
        """Check this set can be compared: ``n`` words if given, distinct words and token ids, and
        (``single_token=True``) one token each. Raises :class:`TargetError` saying how to fix it."""
        if n is not None and len(self.words) != n:
            raise TargetError(f"need exactly {n} target words, got {len(self.words)}: {','.join(self.words)}")
        if len(set(self.words)) != len(self.words) or len(set(self.token_ids)) != len(self.token_ids):
            raise TargetError(f"target words {','.join(self.words)} are not distinct (same word or same tokens); "
                              "pass different words, e.g. he,she")
        multi = [w for w, t in zip(self.words, self.token_ids) if len(t) != 1]
        if single_token and multi:
            raise TargetError(f"target(s) {', '.join(multi)} are several tokens for this tokenizer; next-token "
                              "metrics need one token per word: choose single-token words (e.g. he,she)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Words and token ids as a JSON-ready dict."""
        return {"words": list(self.words), "token_ids": [list(t) for t in self.token_ids]}


def parse_words(spec: str | Sequence[str]) -> list[str]:
    """``"he,she"`` or ``["he", "she"]`` -> ``["he", "she"]`` with a clear error on empties."""
    words = [w.strip() for w in spec.split(",")] if isinstance(spec, str) else [str(w).strip() for w in spec]
    if any(not w for w in words):
        raise TargetError(f"empty target word in {spec!r}; pass words separated by commas, e.g. he,she")
    return words


def resolve_targets(
    tokenizer: Any,
    words: str | Sequence[str] = ("he", "she"),
    *,
    leading_space: bool = True,
    context: str = DEFAULT_CONTEXT,
) -> TargetSet:
    """Resolve target words to token ids as they follow a prompt."""
    words = parse_words(words)
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids: list[tuple[int, ...]] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for w in words:
        text = context + (" " if leading_space else "") + w
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if full[: len(base)] == base and len(full) > len(base):
            tail = full[len(base):]
        else:  # tokenizer merged across the boundary; fall back to the standalone form
            tail = tokenizer((" " if leading_space else "") + w, add_special_tokens=False)["input_ids"]
        if not tail or (unk is not None and unk in tail):
            raise TargetError(
                f"target {w!r} is not in the vocabulary of this tokenizer (got ids {tail}); "
                "choose another word"
            )
        ids.append(tuple(int(i) for i in tail))
    return TargetSet(tuple(words), tuple(ids), leading_space)
