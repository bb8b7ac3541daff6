"""Everything Slicer imports or runs must work on Python 3.9 (Slicer 5.6 and 5.8 ship Python 3.9.10).

That is the module file and the engine (the Slicer panel imports parts of it, and its child process runs the
command line with Slicer's Python). Checked without a 3.9 interpreter:

* the grammar: ``ast.parse(..., feature_version=(3, 9))`` refuses ``match``, ``except*`` and the other syntax that
  came later (ruff's target-version py39 in pyproject.toml checks it too; parenthesised context managers already
  parse on 3.9);
* what parses on 3.9 but fails when it runs there: ``X | Y`` between types outside annotations (annotations are
  strings under ``from __future__ import annotations``; the module file has no such import, so it must use
  ``typing.Optional``), ``zip(strict=)``, ``dataclass(slots=/kw_only=)``, and the standard library's 3.10+ names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICER_FILES = sorted((ROOT / "DTNRegistration").rglob("*.py"))
# Standard library names that 3.9 does not have.
NEWER_NAMES = {
    "itertools.pairwise": "3.10",
    "typing.TypeAlias": "3.10",
    "typing.ParamSpec": "3.10",
    "typing.TypeGuard": "3.10",
    "typing.Concatenate": "3.10",
    "typing.Self": "3.11",
    "typing.Never": "3.11",
    "typing.assert_never": "3.11",
    "typing.LiteralString": "3.11",
    "typing.override": "3.12",
    "contextlib.aclosing": "3.10",
    "contextlib.chdir": "3.11",
    "enum.StrEnum": "3.11",
    "datetime.UTC": "3.11",
    "tomllib": "3.11",
    "importlib.metadata.packages_distributions": "3.10",
}
NEWER_BUILTINS = {"aiter": "3.10", "anext": "3.10", "ExceptionGroup": "3.11", "BaseExceptionGroup": "3.11"}
NEWER_METHODS = {"bit_count": "3.10 (int.bit_count)", "is_relative_to": None}  # is_relative_to is 3.9: allowed
TYPE_NAMES = {"None", "int", "float", "str", "bytes", "bool", "list", "dict", "tuple", "set", "type", "object"}


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (arguments, returns, annotated assignments)."""
    inside = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            annotations = [a.annotation for a in arguments if a.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            inside.update(id(n) for n in ast.walk(annotation))
    return inside


def _looks_like_a_type(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    if isinstance(node, ast.Name):
        return node.id in TYPE_NAMES or node.id[:1].isupper()
    if isinstance(node, ast.Attribute):  # sitk.Image, np.ndarray
        return node.attr[:1].isupper() or node.attr == "ndarray"
    if isinstance(node, ast.Subscript):
        return _looks_like_a_type(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _looks_like_a_type(node.left) or _looks_like_a_type(node.right)
    return False


def problems_on_39(source: str, name: str) -> list[str]:
    """What in ``source`` would fail on Python 3.9 (see the module docstring)."""
    try:
        tree = ast.parse(source, filename=name, feature_version=(3, 9))
    except SyntaxError as err:
        return [f"{name}:{err.lineno}: not Python 3.9 syntax: {err.msg}"]
    future = any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    in_annotations = _annotation_nodes(tree) if future else set()
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in in_annotations:
            if _looks_like_a_type(node.left) and _looks_like_a_type(node.right):
                found.append(f"{where}: `{ast.unparse(node)}` is evaluated at run time: Union/Optional on 3.9")
        if isinstance(node, ast.Call):
            function = ast.unparse(node.func)
            keywords = {k.arg for k in node.keywords}
            if function == "zip" and "strict" in keywords:
                found.append(f"{where}: zip(strict=) is Python 3.10")
            if function.split(".")[-1] == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                found.append(f"{where}: dataclass({', '.join(sorted(keywords))}) is Python 3.10")
            if isinstance(node.func, ast.Attribute) and node.func.attr == "bit_count":
                found.append(f"{where}: int.bit_count is Python 3.10")
        if isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(f"{where}: {node.id} is Python {NEWER_BUILTINS[node.id]}")
        dotted = None
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in NEWER_NAMES:
                    dotted = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            dotted = next((a.name for a in node.names if a.name in NEWER_NAMES), None)
        if dotted in NEWER_NAMES:
            found.append(f"{where}: {dotted} is Python {NEWER_NAMES[dotted]}")
    return found


@pytest.mark.parametrize("path", SLICER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runs_on_python_39(path):
    assert problems_on_39(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("def f(x):\n    match x:\n        case 1:\n            pass\n", "not Python 3.9 syntax"),
        ("x: int | None = None\n", "Union/Optional"),  # no __future__ import: evaluated
        # only line 3's run-time union is a problem, not line 2's annotation (a string under the __future__ import)
        (
            "from __future__ import annotations\nok: int | None = None\nbad = isinstance(1, int | str)\n",
            "snippet.py:3: `int | str` is evaluated at run time",
        ),
        ("pairs = list(zip([1], [2], strict=True))\n", "zip(strict=)"),
        ("from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    pass\n", "dataclass(slots)"),
        ("from itertools import pairwise\n", "itertools.pairwise"),
        ("import typing\nT = typing.TypeAlias\n", "typing.TypeAlias"),
        ("y = anext\n", "anext"),
    ],
)
def test_the_check_finds_what_fails_on_39(snippet, problem):
    found = problems_on_39(snippet, "snippet.py")
    assert found, f"not caught: {snippet!r}"
    # every finding is the expected one: nothing else in the snippet is flagged
    assert all(problem in line for line in found), found


def test_the_check_allows_what_39_runs():
    ok = (
        "from __future__ import annotations\n"
        "def f(a: int | None, *, b: list[str] | None = None) -> dict[str, int] | None:\n"
        "    flags = 1 | 2\n"
        "    merged = {1} | {2}\n"
        "    return None\n"
        "x: 'str | None' = 'a'.removeprefix('a')\n"
    )
    assert problems_on_39(ok, "ok.py") == []
