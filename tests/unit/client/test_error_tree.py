"""The error tree is documented twice, in client/errors.py and in the README; both
drawings must be the real class tree: every class, each under its real parent."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from exgen.client import errors

ROOT = Path(__file__).resolve().parents[3]
NAME = re.compile(r"[A-Z][A-Za-z]+")


def drawn_tree(text: str) -> dict[str, str | None]:
    """{class name: parent name} from a box-drawing tree rooted at ExgenError: a
    class's depth is the column of its name, four per level."""
    at = text.index("ExgenError")
    line_start = text.rfind("\n", 0, at) + 1
    root_col = at - line_start
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in text[line_start:].splitlines():
        match = NAME.search(line)
        prefix = line[:root_col]
        if (
            not line.strip()
            or match is None
            or prefix.strip()
            or not set(line[: match.start()]) <= set(" │├└─")
        ):
            break
        depth = (match.start() - root_col) // 4
        del stack[depth:]
        parents[match[0]] = stack[-1] if stack else None
        stack.append(match[0])
    return parents


def real_tree() -> dict[str, str | None]:
    classes = {
        obj.__name__: obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, errors.ExgenError)
    }
    tree: dict[str, str | None] = {}
    for name, cls in classes.items():
        parent = next((b for b in cls.__mro__[1:] if b.__name__ in classes), None)
        tree[name] = parent.__name__ if parent is not None else None
    return tree


def test_every_library_error_is_in_the_tree():
    tree = real_tree()
    assert "ValidationError" in tree and tree["ValidationError"] == "ExgenError"
    assert set(errors.__all__) - {"error_from_wire"} == set(tree)


def test_the_docstring_draws_the_real_tree():
    assert errors.__doc__ is not None
    assert drawn_tree(errors.__doc__) == real_tree()


def test_the_readme_draws_the_real_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The error tree") :]
    assert drawn_tree(section) == real_tree()


def test_every_wire_code_has_its_class():
    from exgen.client import protocol as P

    codes = {v for k, v in vars(P).items() if k.startswith("E_")}
    assert codes <= set(errors.ERRORS_BY_CODE)
