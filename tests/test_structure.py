"""The package's shape, kept: small modules, short functions, few parameters (the limits issue 28 set).

A function over a limit is a place to name a bundle or split a role; dataclass and pydantic constructors are not
counted (they are generated from fields)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "alignkit"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 400, 60, 6
MODULES = sorted(SRC.rglob("*.py"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _parameters(node: ast.FunctionDef) -> list[str]:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
    return names + (["*" + a.vararg.arg] if a.vararg else []) + (["**" + a.kwarg.arg] if a.kwarg else [])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_within_limits(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= MAX_MODULE_LINES, f"{path.name}: {text.count(chr(10))} lines"
    over = []
    for node in _functions(ast.parse(text)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            over.append(f"{node.name} (line {node.lineno}): {length} lines")
        if len(_parameters(node)) > MAX_PARAMETERS:
            over.append(f"{node.name} (line {node.lineno}): {len(_parameters(node))} parameters")
    assert not over, "; ".join(over)


def test_the_limits_see_a_violation(tmp_path: Path):
    """The checks above would catch a long, wide function."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    tree = ast.parse(f"def f(a, b, c, d, e, f, g):\n{body}\n")
    (node,) = _functions(tree)
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    assert len(_parameters(node)) > MAX_PARAMETERS
