"""The shape of the tests and of the package's imports: what keeps them
easy to extend, checked on the source text.

Tests share helpers through tests/support/ and fixtures through
tests/conftest.py, never by importing another test module (that runs the
other module's fixtures' definitions twice, under pytest-xdist in several
workers, and hides where a fixture lives). A base vassal's file is written
by `support.base_ini`, so that a change of its options is made once.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "psgi_forkserver"
TEST_MODULES = sorted(TESTS.glob("test_*.py"))
# a base vassal's file written out: its preload line, in a string
BASE_TEXT = re.compile(r"""["'][^"'\n]*early-psgi\s*=""")


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or ""), [a.name for a in node.names]))
    return out


def test_the_modules_are_there():
    assert len(TEST_MODULES) > 20
    assert (TESTS / "conftest.py").is_file() and (TESTS / "support" / "__init__.py").is_file()


def test_no_test_module_imports_another():
    found = [f"{p.name}:{line}: {module}" for p in TEST_MODULES for line, module, _ in imports(p)
             if module.split(".")[0].startswith("test_")]
    assert found == [], "share through tests/support/ and tests/conftest.py:\n" + "\n".join(found)


def test_base_files_are_written_by_the_shared_helper():
    found = [f"{p.name}:{n}: {line.strip()}" for p in TEST_MODULES
             for n, line in enumerate(p.read_text().splitlines(), 1) if BASE_TEXT.search(line)]
    assert found == [], "write a base's file with support.base_ini:\n" + "\n".join(found)


def test_fixtures_that_start_emperors_live_in_one_place():
    """The fleet fixtures (emp, emperor, hostile, ctl_emperor, front) are
    conftest's; a test module defining one again would shadow it."""
    shared = {"emp", "emperor", "hostile", "ctl_emperor", "front", "deploy_tmp"}
    found = []
    for p in TEST_MODULES:
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in shared and any(
                    "fixture" in ast.unparse(d) for d in node.decorator_list):
                found.append(f"{p.name}:{node.lineno}: {node.name}")
    assert found == []


def test_no_module_of_the_package_imports_private_names_of_another():
    """A name with a leading underscore is its module's own: another module
    that needs it gets it made public where it is defined."""
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        for line, module, names in imports(p):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{p.relative_to(PACKAGE.parent)}:{line}: from {module} import {', '.join(private)}")
    assert found == [], "\n".join(found)


def test_a_running_emperor_is_supports_emp_and_no_test_wraps_one():
    """A test module keeps no class of its own around an Emperor it starts
    or stops (a second `Fleet`, `Emp`): it gets `support.Emp` from
    `support.Emperors`, and what it adds are functions taking the Emp."""
    starts = {"start_emperor", "stop_emperor", "Emperors", "Emp", "RunningEmperor"}
    found = []
    for p in TEST_MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                called = {ast.unparse(n.func).split(".")[-1] for n in ast.walk(node)
                          if isinstance(n, ast.Call)}
                annotated = {ast.unparse(n.annotation) for n in ast.walk(node)
                             if isinstance(n, ast.AnnAssign)}
                if called & starts or annotated & starts:
                    found.append(f"{p.name}:{node.lineno}: class {node.name}")
    assert found == [], "\n".join(found)
