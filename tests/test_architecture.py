"""The floors of docs/architecture.md hold: imports only go downward, no function is over 60 lines,
no SmolLM2-specific module literal is a default, and every public function is annotated."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bias_lens"
#: package -> packages it must never import (relative or absolute)
FORBIDDEN = {"labels": ("arch", "lens", "scoring", "benchmarks", "locate", "edit", "pipeline", "plot", "cli"),
             "locate": ("edit", "pipeline", "plot", "cli"), "benchmarks": ("locate", "edit", "pipeline", "plot", "cli"),
             "edit": ("pipeline", "plot", "cli"), "pipeline": ("cli",), "plot": ("pipeline", "cli", "edit")}


def _files():
    return sorted(PKG.rglob("*.py"))


def _floor(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported(path: Path) -> set[str]:
    """Top-level bias_lens subpackages/modules imported by ``path`` (relative imports resolved)."""
    tree, out = ast.parse(path.read_text()), set()
    depth_pkg = path.relative_to(PKG).parts[:-1]
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = list(depth_pkg[: len(depth_pkg) - (n.level - 1)]) if n.level - 1 <= len(depth_pkg) else []
                parts = base + (n.module.split(".") if n.module else [])
                names = [a.name for a in n.names] if not parts else []
                out |= {parts[0]} if parts else set(names)
            elif n.module and n.module.startswith("bias_lens."):
                out.add(n.module.split(".")[1])
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("bias_lens.")}
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_downward(path):
    floor = _floor(path)
    bad = _imported(path) & set(FORBIDDEN.get(floor, ()))
    assert not bad, f"{path.relative_to(PKG)} ({floor}) imports {sorted(bad)}"


def test_no_function_over_60_lines():
    long = [f"{p.relative_to(PKG)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in _files()
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_no_model_specific_module_default():
    """``L29`` exists only on 30-layer models: it may appear in docs and messages, never as a default."""
    bad = []
    for p in _files():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in n.args.defaults + [d for d in n.args.kw_defaults if d is not None]:
                    if isinstance(d, ast.Constant) and isinstance(d.value, str) and d.value.startswith("L29"):
                        bad.append(f"{p.relative_to(PKG)}:{n.name}")
            if isinstance(n, ast.keyword) and n.arg == "default" and isinstance(n.value, ast.Constant) \
                    and isinstance(n.value.value, str) and n.value.value.startswith("L29"):
                bad.append(f"{p.relative_to(PKG)}: argparse default {n.value.value}")
    assert not bad, bad


def test_public_functions_are_annotated_and_documented():
    missing = []
    for p in _files():
        tree = ast.parse(p.read_text())
        for n in ast.walk(tree):
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) or n.name.startswith("_"):
                continue
            args = [a for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs if a.arg not in ("self", "cls")]
            if any(a.annotation is None for a in args) or n.returns is None or not ast.get_docstring(n):
                missing.append(f"{p.relative_to(PKG)}:{n.lineno} {n.name}")
    # nested helpers (closures) are private by use; count only module- and class-level definitions
    top = set()
    for p in _files():
        tree = ast.parse(p.read_text())
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                top.add(f"{p.relative_to(PKG)}:{n.lineno} {n.name}")
            if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):  # a private class's methods are private
                top |= {f"{p.relative_to(PKG)}:{m.lineno} {m.name}" for m in n.body
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
    missing = [m for m in missing if m in top]
    assert not missing, missing
