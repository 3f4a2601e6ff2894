"""The package's shape: no import circle between its modules, no module too
long to read (nor a test's or a benchmark's). Read from the source with `ast`, nothing imported."""

import ast
from pathlib import Path

import psgi_forkserver

ROOT = Path(psgi_forkserver.__file__).parent
PACKAGE = "psgi_forkserver"
MAX_LINES = 400
# modules still over MAX_LINES, each to be split; a new one fails the test
TOO_LONG_FOR_NOW: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the imports under `if TYPE_CHECKING:` (never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports_of(name: str, typing: bool = True) -> set[str]:
    """The package's modules `name` imports, at module level or in a
    function; with `typing`, under `if TYPE_CHECKING:` too."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = set() if typing else _type_checking_only(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:  # `from . import plan`: the module
                    out.add(f"{target}.{a.name}")
                elif target in MODULES:
                    out.add(target)
    return out - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# circles only the type checker sees (imports under `if TYPE_CHECKING:`)
TYPE_ONLY_CIRCLES: list[list[str]] = []


def test_no_import_circle_between_the_packages_modules():
    graph = {name: imports_of(name, typing=False) for name in MODULES}
    assert graph[f"{PACKAGE}.emperor.loop"] >= {f"{PACKAGE}.emperor.plan",
                                                  f"{PACKAGE}.emperor.control"}
    assert cycles(graph) == []


def test_no_import_circle_even_for_the_type_checker_but_the_known_one():
    graph = {name: imports_of(name) for name in MODULES}
    assert cycles(graph) == TYPE_ONLY_CIRCLES


def test_the_subsystems_do_not_import_the_emperor():
    """The front door, the status, `prove`, the config and the shared
    modules below them are used by the Emperor, never the other way round."""
    up = {name: sorted(i for i in imports_of(name) if i.startswith(f"{PACKAGE}.emperor"))
          for name in MODULES
          if not name.startswith((f"{PACKAGE}.emperor", f"{PACKAGE}.commands", f"{PACKAGE}.cli"))}
    assert {n: i for n, i in up.items() if i} == {}


def test_no_module_over_400_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in ROOT.rglob("*.py")}
    too_long = {p: n for p, n in lines.items() if n > MAX_LINES}
    assert set(too_long) - set(TOO_LONG_FOR_NOW) == set(), too_long
    assert set(TOO_LONG_FOR_NOW) - set(too_long) == set(), "split: drop it from the list"


PROJECT = ROOT.parent
# the tests and the benchmarks are read too: Python, and the Perl they run
OTHER_CODE = ("tests", "bench")
OTHER_SUFFIXES = {".py", ".pm", ".pl", ".psgi", ".t"}


def test_no_test_or_benchmark_module_over_400_lines():
    lines = {str(p.relative_to(PROJECT)): len(p.read_text(errors="replace").splitlines())
             for d in OTHER_CODE for p in (PROJECT / d).rglob("*")
             if p.suffix in OTHER_SUFFIXES and p.is_file()}
    assert len(lines) > 50
    assert {p: n for p, n in lines.items() if n > MAX_LINES} == {}, "split it along its sections"


PERL = Path(__file__).resolve().parent.parent / "perl" / "ForkServer"
# The Perl side's top level: the four subsystems (each a module and a folder
# of its parts) and the few modules all of them share. Anything else
# belongs in one of the folders.
PERL_SUBSYSTEMS = {"Base", "Spares", "Vassal", "HTTPServer", "Prove", "Process"}
PERL_SHARED = {"Config", "Protocol", "Link", "Log"}
PERL_TOO_LONG_FOR_NOW: dict[str, str] = {}


def test_the_perl_side_is_grouped_by_subsystem():
    top = {p.stem for p in PERL.glob("*.pm")}
    folders = {p.name for p in PERL.iterdir() if p.is_dir()}
    assert top - PERL_SUBSYSTEMS - PERL_SHARED == set(), "a module at the top that belongs in a folder"
    assert folders <= PERL_SUBSYSTEMS, folders - PERL_SUBSYSTEMS


def test_no_perl_module_over_400_lines():
    lines = {str(p.relative_to(PERL)): len(p.read_text().splitlines()) for p in PERL.rglob("*.pm")}
    too_long = {p: n for p, n in lines.items() if n > MAX_LINES}
    assert set(too_long) - set(PERL_TOO_LONG_FOR_NOW) == set(), too_long
    assert set(PERL_TOO_LONG_FOR_NOW) - set(too_long) == set(), "split: drop it from the list"
