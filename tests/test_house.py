"""The house rules that keep the code readable: small modules, short functions, settings passed by name."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("lit_llama", "finetune", "generate", "scripts", "benchmarks")
SOURCES = sorted(path for room in ROOMS for path in (REPO / room).glob("*.py"))


def functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_are_short_and_so_are_their_functions(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400, "a module this long holds two purposes: split it"
    tree = ast.parse(source)
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in functions(tree) if f.end_lineno - f.lineno + 1 > 60]
    assert not long, "functions over 60 lines: cut them into named steps"
    wide = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) > 6]
    assert not wide, "calls with more than 6 positional arguments: pass them by name"


def test_the_model_file_holds_only_the_model():
    source = (REPO / "lit_llama" / "model.py").read_text()
    assert len(source.splitlines()) <= 350
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("lit_llama")} <= {"lit_llama.errors", "lit_llama.files"}
