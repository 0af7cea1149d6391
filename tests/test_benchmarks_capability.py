"""Capability suites against independent recomputations: prompts rebuilt by hand from the CSVs,
plain unpadded ``lm.hf`` forwards with log-softmax by hand, a hand-written greedy loop, accuracy
and perplexity formulas written out again, gendered-word lists re-read from the JSON files."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from bias_lens.benchmarks import capability_data as cd
from bias_lens.benchmarks import sources
from bias_lens.benchmarks.capability import (
    CAPABILITY_SUITES, GSM8K_EXEMPLARS, accuracy_se, capability_sizes, capability_splits, evaluate_capability,
    extract_answer, gsm8k_prompt, neutral_sentences, normalize_number,
)
from bias_lens.benchmarks.generation import greedy_generate
from bias_lens.benchmarks.humaneval import check_completions, run_program

DATA = Path(__file__).resolve().parents[1] / "data"
LET = "ABCD"


@pytest.fixture
def long_llama(tiny_llama):
    """tiny_llama allowed long prompts (RoPE positions are computed on the fly)."""
    tiny_llama.hf.config.max_position_embeddings = 8192
    return tiny_llama


def csv_rows(split: str, subject: str) -> list[list[str]]:
    with open(DATA / f"mmlu/{split}/{subject}_{split}.csv", encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def hand_prompt(subject: str, row: list[str], shots: int) -> str:
    def ex(r, ans):
        body = r[0] + "".join(f"\n{LET[j]}. {r[j + 1]}" for j in range(4))
        return body + "\nAnswer:" + (f" {r[5]}\n\n" if ans else "")
    head = "The following are multiple choice questions (with answers) about "
    head += " " + subject.replace("_", " ") + ".\n\n"
    return head + "".join(ex(r, True) for r in csv_rows("dev", subject)[:shots]) + ex(row, False)


@torch.no_grad()
def plain_continuation(lm, prompt: str, cont: str) -> tuple[float, bool]:
    """Summed log p(cont | prompt) and greedy match, one unpadded forward on prompt+cont ids."""
    p = list(lm.tokenizer(prompt)["input_ids"])
    c = list(lm.tokenizer(cont, add_special_tokens=False)["input_ids"])
    lp = torch.log_softmax(lm.hf(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
    pos = range(len(p) - 1, len(p) + len(c) - 1)
    return sum(float(lp[t, x]) for t, x in zip(pos, c)), all(int(lp[t].argmax()) == x for t, x in zip(pos, c))


# --- MMLU -------------------------------------------------------------------------------------


def test_mmlu_prompt_matches_evaluate_py_format():
    row = csv_rows("test", "high_school_biology")[3]
    for shots in (0, 1, 5):
        got = cd.mmlu_prompt(cd.mmlu_rows("high_school_biology", "test")[3], shots)
        assert got == hand_prompt("high_school_biology", row, shots)
    assert "about  high school biology.\n\n" in got  # evaluate.py's format_subject leading space
    single = cd.mmlu_prompt(cd.mmlu_rows("high_school_biology", "test")[3], 0, style="single")
    assert single.startswith(
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
    )


def test_mmlu_sizes_and_categories():
    assert capability_sizes("mmlu") == {"val": 1543, "test": 14080}
    raw = json.loads((DATA / "mmlu/categories.json").read_text())
    assert len(cd.mmlu_subjects()) == 57
    want = {"STEM": "stem", "humanities": "humanities", "social sciences": "social_sciences",
            "other (business, health, misc.)": "other"}
    for subj, (sub,) in raw["subcategories"].items():
        (cat,) = [c for c, subs in raw["categories"].items() if sub in subs]
        assert cd.mmlu_categories()[subj] == want[cat]


@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_letter_scores_equal_plain_forward(long_llama, shots):
    lm = long_llama
    m, details, opts = evaluate_capability(lm, "mmlu", "val", limit_per_subject=2, limit=6, shots=shots, batch_size=4)
    subjects = cd.mmlu_subjects()[:3]
    assert [(d["subject"], d["index"]) for d in details] == [(s, i) for s in subjects for i in (0, 1)]
    correct = []
    for d in details:
        row = csv_rows("val", d["subject"])[d["index"]]
        prompt = hand_prompt(d["subject"], row, shots)
        lps = [plain_continuation(lm, prompt, " " + x)[0] for x in LET]
        assert d["letter_logprobs"] == pytest.approx(lps, abs=1e-5)
        assert d["pred"] == LET[max(range(4), key=lambda j: lps[j])] and d["answer"] == row[5]
        correct.append(d["pred"] == row[5])
    acc = sum(correct) / 6
    assert m["accuracy"] == pytest.approx(acc) and m["accuracy_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / 6))
    for cat in {d["category"] for d in details}:
        c = [x for x, d in zip(correct, details) if d["category"] == cat]
        assert m[f"accuracy_{cat}"] == pytest.approx(sum(c) / len(c))
    for s in subjects:
        c = [x for x, d in zip(correct, details) if d["subject"] == s]
        assert opts["subject_accuracy"][s] == pytest.approx(sum(c) / 2)
    assert opts["shots"] == shots and opts["limit_per_subject"] == 2


def test_accuracy_se_by_hand():
    assert accuracy_se([True, False, True, True]) == pytest.approx((0.75, math.sqrt(0.75 * 0.25 / 4)))
    assert accuracy_se([False] * 5) == (0.0, 0.0)
    assert accuracy_se([1, 1, 0]) == pytest.approx((2 / 3, math.sqrt(2 / 9 / 3)))
    with pytest.raises(ValueError):
        accuracy_se([])


# --- arithmetic ---------------------------------------------------------------------------------


def test_arithmetic_splits_disjoint_deterministic_and_correct():
    sp = cd.arithmetic_splits()
    assert {k: len(v) for k, v in sp.items()} == {"train": 600, "dev": 150, "test": 300}
    keys = {}
    for name, items in sp.items():
        for r in items:
            op = {"add": "+", "sub": "-", "mul": "*"}[r["op"]]
            assert r["prompt"] == f"{r['a']}{op}{r['b']}=" and int(r["answer"]) == eval(r["prompt"][:-1])
            lo, hi = cd.ARITH_RANGES[op]
            assert lo <= r["a"] <= hi and lo <= r["b"] <= hi and int(r["answer"]) >= 0
            key = (op, *sorted((r["a"], r["b"]))) if op != "-" else (op, r["a"], r["b"])
            assert keys.setdefault(key, name) == name, f"{key} in {keys[key]} and {name}"
    assert [r["op"] for r in sp["test"][:6]] == ["add", "sub", "mul"] * 2
    cd.arithmetic_splits.cache_clear()
    assert cd.arithmetic_splits() == sp
    assert cd.arithmetic_splits(1)["test"] != sp["test"]


def test_arithmetic_scores_equal_plain_forward(tiny_llama):
    m, details, _ = evaluate_capability(tiny_llama, "arithmetic", "test", limit=9, batch_size=4)
    rows = cd.arithmetic_splits()["test"][:9]
    ref = [plain_continuation(tiny_llama, r["prompt"], r["answer"]) for r in rows]
    assert [d["answer_logprob"] for d in details] == pytest.approx([r[0] for r in ref], abs=1e-5)
    assert [d["correct"] for d in details] == [r[1] for r in ref]
    assert m["answer_logprob"] == pytest.approx(sum(r[0] for r in ref) / 9, abs=1e-6)
    acc = sum(r[1] for r in ref) / 9
    assert m["accuracy"] == pytest.approx(acc) and m["accuracy_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / 9))
    for op in ("add", "sub", "mul"):
        assert m[f"accuracy_{op}"] == pytest.approx(sum(r[1] for r, x in zip(ref, rows) if x["op"] == op) / 3)


# --- perplexity ---------------------------------------------------------------------------------


def test_neutral_sentences_have_no_gendered_word():
    sents = neutral_sentences()
    assert len(sents) >= 500 and len(set(sents)) == len(sents) and neutral_sentences(7) == sents[:7]
    bad = {w.lower() for w in json.loads((DATA / "debiaswe/gender_specific_full.json").read_text())}
    for f in ("definitional_pairs", "equalize_pairs"):
        bad |= {w.lower() for p in json.loads((DATA / f"debiaswe/{f}.json").read_text()) for w in p}
    bad |= set("he she his her him hers himself herself man men woman women boy girl male female mr mrs".split())
    single = {w for w in bad if re.fullmatch(r"[a-z]+", w)}
    for s in sents:
        words = re.findall(r"[a-z]+", s.lower())
        assert not single & set(words), s
        joined = " " + " ".join(words) + " "
        assert not any(" " + w.replace("_", " ") + " " in joined for w in bad if "_" in w), s
    assert cd.is_gendered("The Chairman said no.") and cd.is_gendered("A MAN'S hat")
    assert not cd.is_gendered("The other one.")


@torch.no_grad()
def test_perplexity_equals_plain_torch(tiny_llama):
    m, details, opts = evaluate_capability(tiny_llama, "perplexity", "test", limit=3)
    tok, total, n = tiny_llama.tokenizer, 0.0, 0
    for s in neutral_sentences(3):
        ids = [tok.eos_token_id] + tok(s, add_special_tokens=False)["input_ids"]  # tiny tokenizer: no BOS
        lp = torch.log_softmax(tiny_llama.hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total += sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)))
        n += len(ids) - 1
    assert m["n_tokens"] == n and m["mean_token_logprob"] == pytest.approx(total / n, abs=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(-total / n), rel=1e-6)
    assert [d["sentence"] for d in details] == neutral_sentences(3) and opts["prefix"] == "bos"


# --- generation / GSM8K ------------------------------------------------------------------------


@torch.no_grad()
def hand_greedy(lm, prompt: str, n: int) -> str:
    ids = list(lm.tokenizer(prompt)["input_ids"])
    new = []
    for _ in range(n):
        t = int(lm.hf(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if t == lm.tokenizer.eos_token_id:
            break
        new.append(t)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_generation_equals_hand_loop(tiny_llama):
    prompts = ["The nurse said that", "Two plus two is", "The capital of France is Paris . The doctor"]
    want = [hand_greedy(tiny_llama, p, 6) for p in prompts]
    assert greedy_generate(tiny_llama, prompts, max_new_tokens=6, batch_size=2) == want
    stop = want[0][2:4]
    got = greedy_generate(tiny_llama, prompts[:1], max_new_tokens=6, stop=[stop])
    assert got == [want[0][: want[0].find(stop)]]


def test_gsm8k_answer_extraction():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("He pays $1,200.00 in total. The answer is $1,200.") == "1200"
    assert extract_answer("The answer is 12. Then 5 more apples") == "12"
    assert extract_answer("the answer is: -3.50 degrees") == "-3.5"
    assert extract_answer("first 4, then 9, finally 21 apples") == "21"
    assert extract_answer("The answer is unclear, maybe 8") == "8"
    assert extract_answer("no digits here") is None
    assert normalize_number("10") == "10" and normalize_number("0.0") == "0" and normalize_number("1,000") == "1000"
    rows = cd.gsm8k_test()
    assert len(rows) == 1319 and all(normalize_number(r["target"]) is not None for r in rows)
    assert rows[0]["target"] == "18"


def test_gsm8k_exemplars_are_ours_and_consistent():
    test_qs = {r["question"] for r in cd.gsm8k_test()}
    for q, a in GSM8K_EXEMPLARS:
        assert q not in test_qs
        for lhs, rhs in re.findall(r"(\d[\d.]*(?: [-+*/] \d[\d.]*)+) = \$?(\d[\d.]*)", a):
            assert eval(lhs) == pytest.approx(float(rhs))
    p = gsm8k_prompt("How many?", 2)
    assert p == (f"Question: {GSM8K_EXEMPLARS[0][0]}\nAnswer: {GSM8K_EXEMPLARS[0][1]}\n\n"
                 f"Question: {GSM8K_EXEMPLARS[1][0]}\nAnswer: {GSM8K_EXEMPLARS[1][1]}\n\nQuestion: How many?\nAnswer:")


def test_gsm8k_scores_hand_generation(long_llama):
    m, details, opts = evaluate_capability(long_llama, "gsm8k", "test", limit=2, max_new_tokens=4)
    for r, d in zip(cd.gsm8k_test()[:2], details):
        out = hand_greedy(long_llama, f"Question: {r['question']}\nAnswer:", 4)
        out = out[: min([i for i in (out.find(s) for s in opts["stop"]) if i >= 0], default=len(out))]
        assert d["output"] == out and d["pred"] == extract_answer(out) and d["correct"] == (d["pred"] == r["target"])
    assert m["accuracy"] == sum(d["correct"] for d in details) / 2


# --- HumanEval ---------------------------------------------------------------------------------


def test_humaneval_refuses_without_flag(tiny_llama):
    with pytest.raises(ValueError, match="allow_code_execution"):
        evaluate_capability(tiny_llama, "humaneval", "test", limit=1)
    with pytest.raises(ValueError, match="allow_code_execution"):
        check_completions(cd.humaneval_problems()[:1], ["    pass\n"])


def test_humaneval_execution_pass_fail_timeout(monkeypatch):
    p0, p2 = cd.humaneval_problems()[0], cd.humaneval_problems()[2]
    res = check_completions([p0, p2], [p0["canonical_solution"], p2["canonical_solution"]], allow_code_execution=True)
    assert [d["result"] for d in res] == ["passed", "passed"]
    assert check_completions([p0], ["    return not True\n"], allow_code_execution=True)[0]["result"] == "failed"
    loop = check_completions([p0], ["    while True:\n        pass\n"], allow_code_execution=True, timeout=1.5)
    assert loop[0]["result"] == "timed out" and not loop[0]["passed"]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:1")
    probe = ("import os, sys\nassert 'HTTPS_PROXY' not in os.environ and sys.flags.isolated\n"
             "assert os.getcwd() == os.environ['HOME'] and os.listdir('.') == ['program.py']\n")
    assert run_program(probe) == "passed"


# --- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize("kw, msg", [
    ({"suite": "mmlu", "limit_per_subject": 0}, "limit_per_subject"),
    ({"suite": "mmlu", "limit_per_subject": -3}, "limit_per_subject"),
    ({"suite": "arithmetic", "limit_per_subject": 2}, "limit_per_subject"),
    ({"suite": "mmlu", "shots": 6}, "shots"),
    ({"suite": "mmlu", "shots": -1}, "shots"),
    ({"suite": "arithmetic", "shots": 1}, "shots"),
    ({"suite": "mmlu", "split": "dev"}, "split"),
    ({"suite": "mmlu", "limit": 0}, "limit"),
    ({"suite": "boolq"}, "unknown capability suite"),
])
def test_bad_input_raises(tiny_llama, kw, msg):
    kw = {"split": "test", **kw}
    with pytest.raises(ValueError, match=msg):
        evaluate_capability(tiny_llama, kw.pop("suite"), kw.pop("split"), **kw)


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(DATA, root, ignore=shutil.ignore_patterns("test"))
    monkeypatch.setenv("BIAS_LENS_DATA", str(root))
    caches = [cd.mmlu_rows, cd.mmlu_categories, cd.gsm8k_test, cd.humaneval_problems, cd._neutral_all]
    for c in caches:
        c.cache_clear()
    yield root
    monkeypatch.delenv("BIAS_LENS_DATA")
    for c in caches:
        c.cache_clear()


def test_missing_or_malformed_data_raises(data_copy, tiny_llama):
    with pytest.raises(ValueError, match="missing"):
        evaluate_capability(tiny_llama, "mmlu", "test", limit_per_subject=1)
    (data_copy / "gsm8k/test.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match="malformed"):
        cd.gsm8k_test()
    path = data_copy / "mmlu/val/anatomy_val.csv"
    path.write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="malformed"):
        evaluate_capability(tiny_llama, "mmlu", "val", limit_per_subject=1)
    assert sources.data_dir() == data_copy


def test_splits_registry():
    assert CAPABILITY_SUITES == ("mmlu", "arithmetic", "gsm8k", "perplexity", "humaneval")
    assert capability_splits("mmlu") == ("val", "test") and capability_splits("arithmetic") == ("train", "dev", "test")
    assert capability_sizes("humaneval") == {"test": 164} and capability_sizes("gsm8k") == {"test": 1319}
    assert capability_sizes("perplexity") == {"test": len(neutral_sentences())}


# --- SmolLM2 -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_smol_mmlu_and_arithmetic_against_recomputation(smol, one_thread):
    m, details, _ = evaluate_capability(smol, "mmlu", "test", limit_per_subject=1, batch_size=16)
    assert len(details) == 57
    answers = [csv_rows("test", d["subject"])[d["index"]][5] for d in details]
    preds = [LET[max(range(4), key=lambda j: d["letter_logprobs"][j])] for d in details]
    assert m["accuracy"] == pytest.approx(sum(p == a for p, a in zip(preds, answers)) / 57)
    for d in details[::10]:  # 6 questions recomputed with plain forwards on the hand-built prompt
        prompt = hand_prompt(d["subject"], csv_rows("test", d["subject"])[d["index"]], 0)
        ids = torch.tensor([smol.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(smol.hf(input_ids=ids).logits[0, -1].double(), -1)
        letter_ids = [smol.tokenizer(" " + x, add_special_tokens=False)["input_ids"][0] for x in LET]
        assert d["letter_logprobs"] == pytest.approx([float(lp[t]) for t in letter_ids], abs=1e-4)
    # 5-shot: prompts of one subject share the dev-shot prefix, scored through its KV cache
    _, five, _ = evaluate_capability(smol, "mmlu", "test", limit_per_subject=2, limit=2, shots=5)
    for d in five:
        prompt = hand_prompt(d["subject"], csv_rows("test", d["subject"])[d["index"]], 5)
        ids = torch.tensor([smol.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(smol.hf(input_ids=ids).logits[0, -1].double(), -1)
        assert d["letter_logprobs"] == pytest.approx([float(lp[t]) for t in letter_ids], abs=1e-4)
    m, details, _ = evaluate_capability(smol, "arithmetic", "test", limit=100)
    rows = cd.arithmetic_splits()["test"][:100]
    for r, d in list(zip(rows, details))[::10]:
        lp, hit = plain_continuation(smol, r["prompt"], r["answer"])
        assert d["answer_logprob"] == pytest.approx(lp, abs=1e-4) and d["correct"] == hit
    assert m["accuracy"] == pytest.approx(sum(d["correct"] for d in details) / 100)
