"""Readers and generators for the capability suites (MMLU, arithmetic, GSM8K, HumanEval, and the
gender-neutral perplexity corpus). Pure functions over the files shipped in ``data/``
(provenance: ``data/README.md``); nothing downloads anything, nothing is random without a seed.

* MMLU: ``data/mmlu/{dev,val,test}/<subject>_<split>.csv`` rows ``question, A, B, C, D, answer``
  read with Python's ``csv`` (every field kept as the exact string; Hendrycks' evaluate.py reads
  with pandas, which would turn an option ``"1"`` into the integer 1 -- same text for integers).
* Arithmetic: single-step ``"a+b="`` / ``"a-b="`` / ``"a*b="`` prompts (the format of Yu &
  Ananiadou 2024's arithmetic neurons and of arXiv 2501.14457), generated from a seed.
* Neutral sentences: MMLU *val* question stems split into sentences, with every sentence that
  contains a gendered word removed (rule in :func:`neutral_sentences`).
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from . import sources

MMLU_SPLITS = ("dev", "val", "test")
LETTERS = ("A", "B", "C", "D")

# --- MMLU -------------------------------------------------------------------------------------


def _need(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"capability data file {path} is missing; copy it from shared/data (see data/README.md)")
    return path


def _category_key(name: str) -> str:
    """``"other (business, health, misc.)"`` -> ``"other"``, ``"social sciences"`` -> ``"social_sciences"``."""
    return re.sub(r"\W+", "_", name.split("(")[0].strip().lower()).strip("_")


@lru_cache(maxsize=None)
def mmlu_categories() -> dict[str, str]:
    """Subject -> category key (``stem``, ``humanities``, ``social_sciences``, ``other``), from
    ``data/mmlu/categories.json`` (Hendrycks' categories.py: subject -> subcategory -> category)."""
    path = _need(sources.data_dir() / "mmlu/categories.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        sub_to_cat = {s: _category_key(c) for c, subs in raw["categories"].items() for s in subs}
        out = {subj: sub_to_cat[subs[0]] for subj, subs in raw["subcategories"].items()}
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is malformed ({err!r}); restore it from shared/data/mmlu") from err
    return out


def mmlu_subjects() -> tuple[str, ...]:
    """The 57 subjects in sorted order (the order of Hendrycks' evaluate.py)."""
    return tuple(sorted(mmlu_categories()))


@lru_cache(maxsize=None)
def mmlu_rows(subject: str, split: str) -> tuple[dict, ...]:
    """The rows of one subject's CSV, in file order, as dicts with ``index`` (row number)."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU has no split {split!r}; choose one of {', '.join(MMLU_SPLITS)}")
    path = _need(sources.data_dir() / f"mmlu/{split}/{subject}_{split}.csv")
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        for i, r in enumerate(csv.reader(fh)):
            if len(r) != 6 or r[5] not in LETTERS:
                raise ValueError(f"{path} row {i} is malformed (need question,A,B,C,D,answer letter); restore the file")
            out.append({"subject": subject, "index": i, "question": r[0], "choices": r[1:5], "answer": r[5]})
    return tuple(out)


def pretty_subject(subject: str, style: str = "hendrycks") -> str:
    """Hendrycks' ``format_subject`` joins ``" " + word`` per word, so his header reads
    ``"about  abstract algebra."`` (two spaces; ``style="hendrycks"``, default, literal);
    ``style="single"`` gives one space (lm-evaluation-harness' wording)."""
    if style not in ("hendrycks", "single"):
        raise ValueError(f"prompt style must be 'hendrycks' or 'single', got {style!r}")
    words = "".join(" " + w for w in subject.split("_"))
    return words if style == "hendrycks" else words.strip()


def format_question(row: dict, include_answer: bool) -> str:
    """evaluate.py's ``format_example``: question, ``\\nA. ...`` x4, ``\\nAnswer:`` [`` X\\n\\n``]."""
    text = row["question"] + "".join(f"\n{k}. {c}" for k, c in zip(LETTERS, row["choices"]))
    return text + "\nAnswer:" + (f" {row['answer']}\n\n" if include_answer else "")


def mmlu_prompt(row: dict, shots: int = 0, style: str = "hendrycks") -> str:
    """evaluate.py's ``gen_prompt(dev, subject, k) + format_example(test, i, False)``; the shots
    are the first ``shots`` rows of the subject's dev CSV."""
    about = pretty_subject(row["subject"], style)
    head = f"The following are multiple choice questions (with answers) about {about}.\n\n"
    dev = mmlu_rows(row["subject"], "dev")
    if shots > len(dev):
        raise ValueError(f"subject {row['subject']} has only {len(dev)} dev examples; use shots <= {len(dev)}")
    return head + "".join(format_question(d, True) for d in dev[:shots]) + format_question(row, False)


# --- arithmetic -------------------------------------------------------------------------------

ARITH_OPS = ("+", "-", "*")
ARITH_RANGES = {"+": (0, 99), "-": (0, 99), "*": (1, 30)}
ARITH_SIZES = {"train": 200, "dev": 50, "test": 100}  # per operation
ARITH_SEED = 0
_OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def _arith_pool(op: str) -> list[tuple[int, int]]:
    """Unordered operand pairs: ``a <= b`` for + and * (commutative twins stay in one split);
    ``a >= b`` for - (answers are never negative)."""
    lo, hi = ARITH_RANGES[op]
    rng = range(lo, hi + 1)
    return [(a, b) for a in rng for b in rng if (a >= b if op == "-" else a <= b)]


@lru_cache(maxsize=None)
def arithmetic_splits(seed: int = ARITH_SEED) -> dict[str, tuple[dict, ...]]:
    """``{"train", "dev", "test"}`` -> items ``{prompt, answer, op, a, b}``.

    Per operation the unordered pool is shuffled with ``random.Random(f"{seed}-{op}")`` and cut
    into consecutive, disjoint blocks of ``ARITH_SIZES``; for + and * the operand order of each
    item is then drawn from the same generator. So no ``(a, op, b)`` -- nor its commutative twin --
    is in two splits. Each split interleaves the operations (+, -, *, +, ...), so its first
    ``limit`` items stay balanced.
    """
    per_op: dict[str, dict[str, list[dict]]] = {}
    for op in ARITH_OPS:
        rnd = random.Random(f"{seed}-{op}")
        pool = _arith_pool(op)
        rnd.shuffle(pool)
        start, blocks = 0, {}
        for split, n in ARITH_SIZES.items():
            items = []
            for a, b in pool[start : start + n]:
                if op != "-" and rnd.random() < 0.5:
                    a, b = b, a
                ans = a + b if op == "+" else a - b if op == "-" else a * b
                items.append({"prompt": f"{a}{op}{b}=", "answer": str(ans), "op": _OP_NAMES[op], "a": a, "b": b})
            blocks[split] = items
            start += n
        per_op[op] = blocks
    return {s: tuple(x for trio in zip(*(per_op[op][s] for op in ARITH_OPS)) for x in trio) for s in ARITH_SIZES}


# --- GSM8K / HumanEval -------------------------------------------------------------------------


@lru_cache(maxsize=None)
def gsm8k_test() -> tuple[dict, ...]:
    """GSM8K test (1,319) with ``target`` = the text after ``####`` in ``answer``."""
    path = _need(sources.data_dir() / "gsm8k/test.jsonl")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            r = json.loads(line)
            target = r["answer"].rsplit("####", 1)[1].strip()
            out.append({"index": i, "question": r["question"], "answer": r["answer"], "target": target})
        except (KeyError, IndexError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} line {i + 1} is malformed ({err!r}); restore the file") from err
    return tuple(out)


@lru_cache(maxsize=None)
def humaneval_problems() -> tuple[dict, ...]:
    """The 164 HumanEval problems (``task_id, prompt, canonical_solution, test, entry_point``)."""
    path = _need(sources.data_dir() / "humaneval/HumanEval.jsonl.gz")
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    try:
        rows = [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines() if x.strip()]
        return tuple({k: r[k] for k in keys} for r in rows)
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is malformed ({err!r}); restore it from shared/data/humaneval") from err


# --- gender-neutral sentences ------------------------------------------------------------------

EXTRA_GENDERED = frozenset(
    "he she his her him hers himself herself man men woman women boy boys girl girls male males female females "
    "mr mrs ms miss sir madam lady ladies gentleman gentlemen guy guys gal gals father fathers mother mothers "
    "dad mom mum son sons daughter daughters husband husbands wife wives brother brothers sister sisters "
    "uncle aunt nephew niece king queen prince princess grandfather grandmother grandson granddaughter "
    "boyfriend girlfriend masculine feminine maternal paternal pregnant pregnancy widow widower".split()
)
NEUTRAL_EXCLUDED_SUBJECTS = ("human_sexuality",)
_WORD = re.compile(r"[a-z]+")
_SENT_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


@lru_cache(maxsize=None)
def gendered_words() -> tuple[frozenset[str], tuple[tuple[str, ...], ...]]:
    """(single words, multi-word phrases), lower-cased: debiaswe's gender_specific_full +
    definitional + equalize pairs (``_`` splits phrases) + :data:`EXTRA_GENDERED`."""
    entries = list(sources.gender_specific_words())
    for name in ("definitional_pairs", "equalize_pairs"):
        path = _need(sources.data_dir() / f"debiaswe/{name}.json")
        entries += [w for pair in json.loads(path.read_text(encoding="utf-8")) for w in pair]
    words, phrases = set(EXTRA_GENDERED), set()
    for e in entries:
        toks = tuple(_WORD.findall(e.lower().replace("_", " ")))
        if len(toks) == 1:
            words.add(toks[0])
        elif toks:
            phrases.add(toks)
    return frozenset(words), tuple(sorted(phrases))


def is_gendered(text: str) -> bool:
    """True when any lower-cased ``[a-z]+`` word of ``text`` (or a run of them) is in the lists."""
    words, phrases = gendered_words()
    toks = _WORD.findall(text.lower())
    if any(t in words for t in toks):
        return True
    joined = " " + " ".join(toks) + " "
    return any(" " + " ".join(p) + " " in joined for p in phrases)


@lru_cache(maxsize=None)
def _neutral_all() -> tuple[str, ...]:
    out, seen = [], set()
    for subject in mmlu_subjects():
        if subject in NEUTRAL_EXCLUDED_SUBJECTS:
            continue
        for row in mmlu_rows(subject, "val"):
            for s in _SENT_END.split(row["question"].strip()):
                s = s.strip()
                n = len(s.split())
                ok = 6 <= n <= 40 and s[0].isupper() and s[-1] in ".?!" and s.isascii()
                if ok and not any(c in s for c in "\n|_$\\") and s not in seen and not is_gendered(s):
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def neutral_sentences(limit: int | None = None) -> list[str]:
    """Gender-neutral English sentences for perplexity (fixed order; first ``limit``).

    Source: MMLU **val** question stems (MIT; Hendrycks et al. 2021), subjects in sorted order
    except ``human_sexuality``, rows in file order, each stem split into sentences at ``.?!``
    followed by whitespace and a capital. A sentence is kept when it has 6-40 words, starts with a
    capital, ends with ``.?!``, is ASCII, has no newline, ``|``, ``_`` (fill-in blanks), ``$`` or
    backslash (LaTeX), was not kept before (exact duplicate), and contains no gendered word
    (:func:`is_gendered`). Not filtered: personal names (no shipped name list). Because the text
    is MMLU val, report MMLU on ``test`` for a model edited with this corpus as retention text.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    sents = _neutral_all()
    return list(sents[:limit] if limit is not None else sents)
