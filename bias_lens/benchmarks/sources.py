"""Readers for the source files shipped in ``data/`` (provenance and licenses: ``data/README.md``).

Everything here is a pure reader with a small cache: no randomness, no model. The data folder is
``<repo>/data`` or ``$BIAS_LENS_DATA`` when set (for installs outside the repository).
"""

from __future__ import annotations

import csv
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any


def data_dir() -> Path:
    """The folder holding the shipped benchmark sources."""
    root = Path(os.environ.get("BIAS_LENS_DATA", Path(__file__).resolve().parents[2] / "data"))
    if not (root / "professions.json").is_file():
        raise FileNotFoundError(
            f"benchmark data not found in {root}; run from a bias_lens checkout or set BIAS_LENS_DATA "
            "to its data/ folder"
        )
    return root


def _read_json(rel: str) -> Any:
    """Parse ``data/<rel>``; a missing or malformed file is one ValueError naming it and the fix."""
    path = data_dir() / rel
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"benchmark data file {path} is missing; restore it from the repository's data/ "
                         "(or shared/data)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"benchmark data file {path} is malformed ({err}); restore it from the repository's "
                         "data/ (or shared/data)") from None


def _read_jsonl(rel: str) -> tuple[dict, ...]:
    """JSON lines of ``data/<rel>``, with the same one-line errors as :func:`_read_json`."""
    path = data_dir() / rel
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return tuple(json.loads(x) for x in lines if x.strip())
    except FileNotFoundError:
        raise ValueError(f"benchmark data file {path} is missing; restore it from the repository's data/") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"benchmark data file {path} is malformed ({err}); restore it from the repository's "
                         "data/") from None


@lru_cache(maxsize=None)
def professions() -> tuple[tuple[str, float, float], ...]:
    """The 320 Bolukbasi professions as ``(word, f, s)``; ``_`` in multi-word entries becomes a space."""
    return tuple((w.replace("_", " "), float(f), float(s)) for w, f, s in _read_json("professions.json"))


@lru_cache(maxsize=None)
def gender_specific_words() -> frozenset[str]:
    """debiaswe's full gender-specific word list (1441 words), lower-cased."""
    return frozenset(w.lower() for w in _read_json("debiaswe/gender_specific_full.json"))


@lru_cache(maxsize=None)
def dama_source() -> tuple[dict, ...]:
    """DAMA's ``train_dama.json`` (2409 prompts = 219 professions x 11 templates)."""
    return tuple(_read_json("dama/train_dama.json"))


@lru_cache(maxsize=None)
def stereoset_selection(axis: str) -> tuple[dict, ...]:
    """BiasEdit's StereoSet test selection of one bias type (``{axis}_test.json``), labels as shipped."""
    return tuple(_read_json(f"stereoset/{axis}_test.json"))


@lru_cache(maxsize=None)
def stereoset_reverse() -> tuple[dict, ...]:
    """BiasEdit's gender-reversal set (``gender_test_reverse.json``, 253 items), labels as shipped."""
    return tuple(_read_json("stereoset/gender_test_reverse.json"))


@lru_cache(maxsize=None)
def stereoset_synonym(axis: str) -> tuple[dict, ...]:
    """BiasEdit's synonym-augmented test set of one bias type (``syn/{axis}_test_syn.json``), as shipped."""
    return tuple(_read_json(f"stereoset/syn/{axis}_test_syn.json"))


@lru_cache(maxsize=None)
def stereoset_official() -> tuple[dict, ...]:
    """The official StereoSet dev set, flattened (4,229 rows: ``type`` intra-/intersentence, ``target``,
    ``bias_type``, ``context``, ``stereotype``, ``anti-stereotype``, ``unrelated``), official labels."""
    return _read_jsonl("stereoset/official_dev.jsonl")


@lru_cache(maxsize=None)
def stereoset_dev() -> tuple[dict, ...]:
    """The embedded StereoSet dev set as parsed JSON records (cached: read once per process)."""
    return tuple(_read_json("stereoset/dev.json"))


@lru_cache(maxsize=None)
def crows_pairs() -> tuple[dict[str, str], ...]:
    """The embedded CrowS-Pairs (anonymised) CSV rows as dicts (cached: read once per process)."""
    with open(data_dir() / "crows_pairs/crows_pairs_anonymized.csv", encoding="utf-8", newline="") as fh:
        return tuple(dict(r) for r in csv.DictReader(fh))


@lru_cache(maxsize=None)
def winogender_templates() -> tuple[dict[str, str], ...]:
    """The embedded Winogender template TSV rows as dicts (cached: read once per process)."""
    with open(data_dir() / "winogender/templates.tsv", encoding="utf-8", newline="") as fh:
        return tuple(dict(r) for r in csv.DictReader(fh, delimiter="\t"))


@lru_cache(maxsize=None)
def winogender_sentences() -> tuple[tuple[str, str], ...]:
    """``(sentid, sentence)`` rows of ``all_sentences.tsv`` (720)."""
    with open(data_dir() / "winogender/all_sentences.tsv", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return tuple((a, b) for a, b in rows[1:])


@lru_cache(maxsize=None)
def winogender_bls() -> dict[str, float]:
    """Occupation -> BLS 2015 % female."""
    with open(data_dir() / "winogender/occupations-stats.tsv", encoding="utf-8", newline="") as fh:
        return {r["occupation"]: float(r["bls_pct_female"]) for r in csv.DictReader(fh, delimiter="\t")}


_WB_LINE = re.compile(r"^(\d+)\s+(.*)$")


@lru_cache(maxsize=None)
def winobias_lines(kind: str, wtype: int, split: str) -> tuple[tuple[int, str, str], ...]:
    """``(line_no, plain_sentence, bracketed_sentence)`` from ``{kind}_stereotyped_type{wtype}.txt.{split}``."""
    path = data_dir() / f"winobias/{kind}_stereotyped_type{wtype}.txt.{split}"
    out = []
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not raw.strip():
            continue
        m = _WB_LINE.match(raw.strip())
        text = m.group(2) if m else raw.strip()
        out.append((i, re.sub(r"\s+", " ", text.replace("[", "").replace("]", "")).strip(), text))
    return tuple(out)


@lru_cache(maxsize=None)
def retention_probe() -> tuple[dict, ...]:
    """The factual/arithmetic completion probe written for the project (``data/retention/probe.jsonl``)."""
    return _read_jsonl("retention/probe.jsonl")
