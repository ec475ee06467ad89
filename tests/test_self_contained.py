"""A clone passes its tests with nothing beside it: no test reads outside the repository."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.fake_openai import SPEC_PATH
from tests.fixtures.make_openai_subset import SCHEMA_NAMES, referenced_names

TESTS = REPO / "tests"
OUTSIDE_NAMES = ("../shared", "shared/reference")  # where the full spec lived, beside the repository


def _from_file(node: ast.AST) -> bool:
    """True when an expression is built on `__file__`."""
    return any(isinstance(name, ast.Name) and name.id == "__file__" for name in ast.walk(node))


def _climb(node: ast.AST) -> int | None:
    """How many folders `node` climbs from `__file__`: `parents[N]` is N + 1, `.parent.parent` is 2."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
        index = node.slice
        if node.value.attr == "parents" and isinstance(index, ast.Constant) and isinstance(index.value, int):
            return index.value + 1 if _from_file(node.value.value) else None
    levels = 0
    while isinstance(node, ast.Attribute) and node.attr == "parent":
        levels, node = levels + 1, node.value
    return levels if levels and _from_file(node) else None


def escapes(source: str, where: Path) -> list[str]:
    """Places in the Python file at `where` (relative to the repository) that reach above it, or name the spec."""
    depth = len(where.parts)  # climbing this many folders from the file reaches the repository; more leave it
    found = []
    for node in ast.walk(ast.parse(source)):
        levels = _climb(node)
        if levels is not None and levels > depth:
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{where}:{node.lineno}: {name!r}" for name in OUTSIDE_NAMES if name in node.value]
    return found


def test_no_test_reaches_outside_the_repository() -> None:
    files = [path for path in sorted(TESTS.rglob("*.py")) if path != Path(__file__)]  # this one names them
    assert len(files) > 20
    assert [
        e for path in files for e in escapes(path.read_text(encoding="utf-8"), path.relative_to(REPO))
    ] == []


def test_the_scan_finds_the_old_spec_path() -> None:
    source = (
        'A = Path(__file__).resolve().parents[1] / "fixtures"\n'
        'B = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"\n'
        "E = '../shared/reference/openai-openapi.yaml'\n"
        "C = Path(__file__).parent.parent.parent / 'x'\n"
        "D = tmp_path.parent.parent.parent\n"
    )
    assert escapes(source, Path("tests/fixtures/old.py")) == [
        "tests/fixtures/old.py:3: '../shared'",
        "tests/fixtures/old.py:3: 'shared/reference'",
    ]
    assert sorted(escapes(source, Path("tests/old.py"))) == [
        "tests/old.py:2: Path(__file__).resolve().parents[2]",
        "tests/old.py:3: '../shared'",
        "tests/old.py:3: 'shared/reference'",
        "tests/old.py:4: Path(__file__).parent.parent.parent",
    ]


def _keys(node: object) -> list[str]:
    if isinstance(node, dict):
        return [*node, *(key for value in node.values() for key in _keys(value))]
    if isinstance(node, list):
        return [key for item in node for key in _keys(item)]
    return []


def test_the_spec_subset_is_self_contained_and_licensed() -> None:
    assert SPEC_PATH.is_file() and SPEC_PATH.is_relative_to(TESTS / "fixtures")
    schemas = json.loads(SPEC_PATH.read_text(encoding="utf-8"))["components"]["schemas"]
    assert set(SCHEMA_NAMES) <= set(schemas)
    assert {name for schema in schemas.values() for name in referenced_names(schema)} <= set(schemas)
    assert "nullable" not in _keys(schemas)  # translated to JSON Schema
    licence = (SPEC_PATH.parent / "openai-openapi.LICENSE").read_text()
    assert licence.startswith("The MIT License") and "Copyright (c) OpenAI" in licence


def test_the_fake_checks_bodies_in_a_copy_with_nothing_beside_it(tmp_path: Path) -> None:
    repo = tmp_path / "alone" / "repo"
    shutil.copytree(TESTS, repo / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    program = (
        "from tests.fake_openai import SPEC_PATH, spec_violation\n"
        "print(SPEC_PATH)\n"
        "error = {'error': {'message': 'm', 'type': 't', 'param': None, 'code': None}}\n"
        "print(spec_violation(error, 'ErrorResponse'))\n"
        "print(spec_violation({'model': 'gpt-4o-mini'}, 'CreateChatCompletionRequest'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=repo, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(repo / "tests" / "fixtures" / "openai-schemas.json"),
        "None",
        "'messages' is a required property (at $)",
    ]
