"""The benchmark scripts are not run in CI (they need the real model and minutes), so a name they import from
alignkit that moves or is renamed would only show when someone runs them: every `from alignkit... import name` in
benchmarks/*.py (at any depth: most imports sit inside functions) must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def alignkit_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from alignkit.x import name` in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.lineno, node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "alignkit"
            for alias in node.names]


def missing_names(path: Path) -> list[str]:
    missing = []
    for line, module, name in alignkit_imports(path):
        if not hasattr(importlib.import_module(module), name):
            try:  # a submodule: `from alignkit.online import run`
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{path.name}:{line}: from {module} import {name}")
    return missing


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_alignkit_name_a_benchmark_imports_exists(path):
    assert not missing_names(path)


def test_the_check_finds_a_name_that_is_not_there(tmp_path):
    script = tmp_path / "bench_x.py"
    script.write_text("import json\n\n\ndef main():\n    from alignkit.online import run\n"
                      "    from alignkit.online.run import run_online, no_such_name\n")
    assert missing_names(script) == ["bench_x.py:6: from alignkit.online.run import no_such_name"]
