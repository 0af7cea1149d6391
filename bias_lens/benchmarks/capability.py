"""Capability benchmarks: does a (debiased) model still know things, do sums, reason and model text?

Suites (:data:`CAPABILITY_SUITES`; data and provenance in ``data/README.md``, choices in
``docs/capability.md``):

* ``mmlu`` -- Hendrycks et al. 2021, 57 subjects, splits ``val``/``test`` (``dev`` holds the
  shots). Prompt = evaluate.py's ``gen_prompt`` + ``format_example`` (``shots`` 0..5 first dev
  rows of the subject); the prediction is the argmax of the next-token log-probs of the letters
  " A".." D" after ``"Answer:"``. ``limit_per_subject=N`` keeps the first N rows of every
  subject's CSV in file order (deterministic, stratified by subject).
* ``arithmetic`` -- single-step ``"a+b="``, ``"a-b="``, ``"a*b="`` prompts
  (:func:`.capability_data.arithmetic_splits`), greedy exact match of the answer's tokens.
* ``gsm8k`` -- Cobbe et al. 2021 test, greedy generation; exemplars (``shots``) are our own
  :data:`GSM8K_EXEMPLARS`, never GSM8K rows. Opt-in (slow).
* ``perplexity`` -- on :func:`.capability_data.neutral_sentences` (gender-neutral MMLU val text).
* ``humaneval`` -- :mod:`.humaneval`; runs generated code, needs ``allow_code_execution=True``.

Accuracy standard errors are binomial, ``sqrt(acc (1 - acc) / n)``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from ..targets import resolve_targets
from . import capability_data as cd
from . import metrics as bm
from .generation import greedy_generate
from .humaneval import HUMANEVAL_STOP, humaneval_eval
from .next_token import next_token_logprobs
from .sentence_scoring import continuation_scores, token_logprobs

CAPABILITY_SUITES = ("mmlu", "arithmetic", "gsm8k", "perplexity", "humaneval")
_SPLITS = {"mmlu": ("val", "test"), "arithmetic": tuple(cd.ARITH_SIZES), "gsm8k": ("test",),
           "perplexity": ("test",), "humaneval": ("test",)}
MAX_SHOTS = 5
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "humaneval": 256}
neutral_sentences = cd.neutral_sentences

# Written for this project (not GSM8K rows, so k-shot never leaks test items).
GSM8K_EXEMPLARS = (
    ("A bakery makes 24 rolls in the morning and 18 rolls in the afternoon. It sells 30 rolls. "
     "How many rolls are left?",
     "The bakery makes 24 + 18 = 42 rolls. After selling 30, 42 - 30 = 12 rolls are left. The answer is 12."),
    ("A box holds 6 pencils. How many pencils are there in 7 boxes and 5 loose pencils together?",
     "7 boxes hold 7 * 6 = 42 pencils. With the loose ones there are 42 + 5 = 47 pencils. The answer is 47."),
    ("A train travels 60 kilometers per hour. How many kilometers does it travel in 3.5 hours?",
     "In 3.5 hours it travels 60 * 3.5 = 210 kilometers. The answer is 210."),
    ("Tickets cost $8 each. A group buys 5 tickets and pays with a $50 bill. How much change does the group get?",
     "5 tickets cost 5 * 8 = $40. The change is 50 - 40 = $10. The answer is 10."),
    ("A garden has 4 rows of 9 tomato plants. One quarter of the plants are taken to a market. "
     "How many plants stay in the garden?",
     "There are 4 * 9 = 36 plants. One quarter is 36 / 4 = 9 plants. So 36 - 9 = 27 plants stay. The answer is 27."),
)
GSM8K_STOP = ("\nQuestion:", "\n\n\n")


def capability_splits(suite: str) -> tuple[str, ...]:
    """The splits a capability suite offers (MMLU's ``dev`` is reserved for shots)."""
    if suite not in _SPLITS:
        raise ValueError(f"unknown capability suite {suite!r}; choose one of {', '.join(CAPABILITY_SUITES)}")
    return _SPLITS[suite]


def capability_sizes(suite: str) -> dict[str, int]:
    """Number of items per split (MMLU: questions over all 57 subjects)."""
    splits = capability_splits(suite)
    if suite == "mmlu":
        return {s: sum(len(cd.mmlu_rows(subj, s)) for subj in cd.mmlu_subjects()) for s in splits}
    if suite == "arithmetic":
        return {s: len(v) for s, v in cd.arithmetic_splits().items()}
    n = {"gsm8k": lambda: len(cd.gsm8k_test()), "perplexity": lambda: len(cd.neutral_sentences()),
         "humaneval": lambda: len(cd.humaneval_problems())}[suite]()
    return {"test": n}


def accuracy_se(correct: Sequence[bool]) -> tuple[float, float]:
    """``(accuracy, sqrt(acc (1 - acc) / n))`` of a correctness vector."""
    n = len(correct)
    if n == 0:
        raise ValueError("no items to compute an accuracy on")
    acc = sum(bool(c) for c in correct) / n
    return acc, math.sqrt(acc * (1 - acc) / n)


def _check_prompt_lengths(lm: Any, prompts: Sequence[str]) -> None:
    cap = getattr(lm.hf.config, "max_position_embeddings", None)
    if cap is None:
        return
    longest = max(len(x) for x in lm.tokenizer(list(prompts))["input_ids"])
    if longest > cap:
        raise ValueError(f"a prompt has {longest} tokens, more than the model's {cap} positions; use fewer shots")


def mmlu_eval(
    lm: Any, split: str, *, shots: int = 0, limit_per_subject: int | None = None, limit: int | None = None,
    batch_size: int = 32, progress: bool = False, style: str = "hendrycks",
    prompt_fn: Callable[[list[str]], list[str]] | None = None,
) -> tuple[dict[str, float], list[dict], dict]:
    """MMLU accuracy, overall and per category; per-subject accuracy in the options. ``prompt_fn``
    rewrites the prompts before scoring (e.g. prepends a start token; default: as built)."""
    cats = cd.mmlu_categories()
    rows = [r for s in cd.mmlu_subjects() for r in cd.mmlu_rows(s, split)[:limit_per_subject]][:limit]
    prompts = [cd.mmlu_prompt(r, shots, style) for r in rows]
    prompts = prompt_fn(prompts) if prompt_fn is not None else prompts
    _check_prompt_lengths(lm, prompts)
    letters = resolve_targets(lm.tokenizer, cd.LETTERS, context="Answer:")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):  # per subject when shots share a long prefix (KV cache reuse)
        groups[r["subject"] if shots else ""].append(i)
    lps: list[Any] = [None] * len(rows)
    for idx in groups.values():
        out = next_token_logprobs(lm, [prompts[i] for i in idx], letters, batch_size=batch_size, progress=progress)
        for j, i in enumerate(idx):
            lps[i] = out[j]
    details = []
    for r, lp in zip(rows, lps):
        pred = cd.LETTERS[int(lp.argmax())]
        details.append({"subject": r["subject"], "category": cats[r["subject"]], "index": r["index"],
                        "answer": r["answer"], "pred": pred, "correct": pred == r["answer"],
                        "letter_logprobs": [float(x) for x in lp]})
    acc, se = accuracy_se([d["correct"] for d in details])
    m = {"accuracy": acc, "accuracy_se": se}
    by_cat, by_subj = defaultdict(list), defaultdict(list)
    for d in details:
        by_cat[d["category"]].append(d["correct"])
        by_subj[d["subject"]].append(d["correct"])
    for c in sorted(set(cats.values())):
        if by_cat[c]:
            m[f"accuracy_{c}"] = accuracy_se(by_cat[c])[0]
    subj_acc = {s: accuracy_se(v)[0] for s, v in by_subj.items()}
    m["accuracy_subject_macro"] = sum(subj_acc.values()) / len(subj_acc)
    opts = {"shots": shots, "limit_per_subject": limit_per_subject, "subset": "first rows per subject in file order",
            "prompt_style": style, "letter_token_ids": [list(t) for t in letters.token_ids],
            "subject_accuracy": subj_acc, "subject_n": {s: len(v) for s, v in by_subj.items()}}
    return m, details, opts


def arithmetic_eval(
    lm: Any, split: str, *, limit: int | None = None, batch_size: int = 32,
    prompt_fn: Callable[[list[str]], list[str]] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy exact match and summed log-prob of the answer after ``"a op b="`` (``prompt_fn``: as
    :func:`mmlu_eval`'s)."""
    rows = list(cd.arithmetic_splits()[split][:limit])
    prompts = [r["prompt"] for r in rows]
    prompts = prompt_fn(prompts) if prompt_fn is not None else prompts
    lp, hit = continuation_scores(lm, prompts, [r["answer"] for r in rows], batch_size=batch_size)
    details = [{**r, "answer_logprob": float(a), "correct": bool(h)} for r, a, h in zip(rows, lp, hit)]
    acc, se = accuracy_se([d["correct"] for d in details])
    m = {"accuracy": acc, "accuracy_se": se, "answer_logprob": float(lp.mean())}
    for op in ("add", "sub", "mul"):
        c = [d["correct"] for d in details if d["op"] == op]
        if c:
            m[f"accuracy_{op}"] = accuracy_se(c)[0]
    return m, details


def perplexity_eval(
    lm: Any, *, limit: int | None = None, batch_size: int = 32, progress: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """Corpus perplexity of the neutral sentences, each conditioned on BOS (EOS if none)."""
    sents = cd.neutral_sentences(limit)
    lps = token_logprobs(lm, sents, prefix="bos", batch_size=batch_size, progress=progress)
    n_tok = sum(len(t) for t in lps)
    m = {"perplexity": bm.perplexity(lps), "mean_token_logprob": float(sum(float(t.sum()) for t in lps) / n_tok),
         "n_tokens": float(n_tok)}
    return m, [{"sentence": s, "logprob_sum": float(t.sum()), "n_tokens": len(t)} for s, t in zip(sents, lps)]


_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_MARKER = re.compile(r"####|the answer is", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """``"$1,000.50"`` -> ``"1000.5"``, ``"18.00"`` -> ``"18"``; None if not a number."""
    s = text.replace("$", "").replace(",", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return format(d.normalize(), "f") if d != 0 else "0"


def extract_answer(text: str) -> str | None:
    """The first number after the last ``####`` or "The answer is" (case-insensitive); without a
    marker (or no number after it), the last number in the text. Normalised; None if no number."""
    marks = list(_MARKER.finditer(text))
    if marks:
        m = _NUM.search(text, marks[-1].end())
        if m:
            return normalize_number(m.group())
    nums = _NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


def gsm8k_prompt(question: str, shots: int = 0) -> str:
    """GSM8K prompt for ``question``: ``shots`` exemplar Q/A pairs, then the question and ``Answer:``."""
    ex = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in GSM8K_EXEMPLARS[:shots])
    return f"{ex}Question: {question}\nAnswer:"


def gsm8k_eval(
    lm: Any, *, shots: int = 0, limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Exact match of the extracted final number against ``#### N``."""
    rows = list(cd.gsm8k_test()[:limit])
    outs = greedy_generate(lm, [gsm8k_prompt(r["question"], shots) for r in rows], max_new_tokens=max_new_tokens,
                           stop=GSM8K_STOP, batch_size=batch_size, progress=progress)
    details = []
    for r, o in zip(rows, outs):
        pred, gold = extract_answer(o), normalize_number(r["target"])
        details.append({"index": r["index"], "output": o, "pred": pred, "target": gold, "correct": pred == gold})
    acc, se = accuracy_se([d["correct"] for d in details])
    return {"accuracy": acc, "accuracy_se": se}, details


def _validate(suite: str, split: str, limit: int | None, limit_per_subject: int | None, shots: int,
              batch_size: int, max_new_tokens: int | None) -> None:
    if split not in capability_splits(suite):
        raise ValueError(f"suite {suite!r} has no split {split!r}; choose one of {', '.join(capability_splits(suite))}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit_per_subject is not None and (suite != "mmlu" or limit_per_subject < 1):
        raise ValueError(
            f"limit_per_subject must be >= 1 and applies to mmlu only, got {limit_per_subject} for {suite}"
        )
    if not isinstance(shots, int) or not 0 <= shots <= MAX_SHOTS or (shots and suite not in ("mmlu", "gsm8k")):
        raise ValueError(f"shots must be an integer in 0..{MAX_SHOTS} (mmlu and gsm8k only), got {shots!r} for {suite}")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise ValueError("batch_size and max_new_tokens must be >= 1")


def evaluate_capability(
    lm: Any, suite: str, split: str, *, limit: int | None = None, limit_per_subject: int | None = None,
    shots: int = 0, batch_size: int = 32, progress: bool = False, max_new_tokens: int | None = None,
    allow_code_execution: bool = False, timeout: float = 10.0,
) -> tuple[dict[str, float], list[dict], dict]:
    """Run one capability suite: ``(metrics, per-item details, options)``.

    ``limit`` keeps the first ``limit`` items in the suite's fixed order (MMLU: after
    ``limit_per_subject``, subjects sorted -- so not stratified; prefer ``limit_per_subject``).
    ``max_new_tokens`` defaults to 256 for gsm8k and humaneval; generation batches are
    ``min(batch_size, 8)``. ``allow_code_execution`` must be True for ``humaneval``.
    """
    _validate(suite, split, limit, limit_per_subject, shots, batch_size, max_new_tokens)
    opts: dict[str, Any] = {"suite": suite, "split": split, "limit": limit}
    if suite == "mmlu":
        m, details, extra = mmlu_eval(lm, split, shots=shots, limit_per_subject=limit_per_subject, limit=limit,
                                      batch_size=batch_size, progress=progress)
        return m, details, {**opts, **extra}
    if suite == "arithmetic":
        m, details = arithmetic_eval(lm, split, limit=limit, batch_size=batch_size)
        ranges = {k: list(v) for k, v in cd.ARITH_RANGES.items()}
        opts.update(seed=cd.ARITH_SEED, ranges=ranges, scoring="greedy exact match")
    elif suite == "perplexity":
        m, details = perplexity_eval(lm, limit=limit, batch_size=batch_size, progress=progress)
        opts.update(prefix="bos", source="MMLU val question sentences without gendered words")
    else:
        new = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[suite]
        gen_bs = min(batch_size, 8)
        opts.update(max_new_tokens=new, decoding="greedy")
        if suite == "gsm8k":
            m, details = gsm8k_eval(lm, shots=shots, limit=limit, max_new_tokens=new, batch_size=gen_bs,
                                    progress=progress)
            opts.update(shots=shots, exemplars="bias_lens GSM8K_EXEMPLARS (not GSM8K data)", stop=list(GSM8K_STOP))
        else:
            m, details = humaneval_eval(lm, limit=limit, max_new_tokens=new, batch_size=gen_bs, progress=progress,
                                        allow_code_execution=allow_code_execution, timeout=timeout)
            opts.update(timeout_s=timeout, stop=list(HUMANEVAL_STOP))
    return m, details, opts

