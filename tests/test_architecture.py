"""The package's import order (docs/architecture.md): every import goes down a floor, none goes round in a circle.

Every ``import`` of the package's own modules is checked, at module level and inside functions
alike (an import inside a function is no way round the order), ``TYPE_CHECKING`` blocks included.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvpress_aqua"

FLOORS = (
    ("util", "_version"),
    ("model_info",),
    ("data", "loading"),
    ("ops",),
    ("artifacts",),
    ("policies",),
    ("attention",),
    ("core",),
    ("presets",),
    ("calibration", "planner"),
    ("evaluation",),
    ("cli",),
)
"""Lowest first. A module may import modules of lower floors and of its own folder, never a higher floor
or another folder of its own floor."""

FLOOR = {folder: level for level, folders in enumerate(FLOORS) for folder in folders}
CLI_SHARED = ("common",)
"""The CLI modules that commands share; a command never imports another command."""


def _module(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``kvpress_aqua`` module in a file, resolved to absolute names."""
    module = _module(path, package_dir)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name == "kvpress_aqua" or name.startswith("kvpress_aqua.")]


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph(package: Path = PACKAGE) -> dict[str, list[tuple[int, str]]]:
    modules = {_module(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = []
        for line, target in _imports(path, package):
            while target not in modules and "." in target:  # "pkg.module.Name" -> "pkg.module"
                target = target.rpartition(".")[0]
            edges.append((line, target))
        graph[name] = edges
    return graph


def test_every_folder_has_a_floor():
    folders = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.iterdir()
               if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert folders <= FLOOR.keys(), f"give {sorted(folders - FLOOR.keys())} a floor in FLOORS and docs/architecture.md"


def _against_the_order(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for importer, edges in graph.items():
        source = _folder(importer)
        if source is None:  # the package's public face loads its names lazily, from any floor
            continue
        for line, target in edges:
            folder = _folder(target)
            if folder is None or folder == source:
                continue
            if FLOOR[folder] >= FLOOR[source]:
                bad.append(f"{importer}:{line} imports {target} (floor {FLOOR[folder]} >= {FLOOR[source]})")
    return bad


def test_imports_go_down_never_up_or_sideways():
    bad = _against_the_order(_graph())
    assert not bad, "imports against the order:\n" + "\n".join(bad)


def test_cli_commands_do_not_import_each_other():
    bad = []
    for importer, edges in _graph().items():
        if not importer.startswith("kvpress_aqua.cli.") or importer.rpartition(".")[2] in CLI_SHARED:
            continue
        for line, target in edges:
            leaf = target.rpartition(".")[2]
            if target.startswith("kvpress_aqua.cli.") and leaf not in CLI_SHARED and not leaf.startswith("_"):
                bad.append(f"{importer}:{line} imports the command {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: sorted({target for _, target in edges if target != name}) for name, edges in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if nxt == "kvpress_aqua":
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_upward_imports_in_functions_and_type_checking_blocks(tmp_path):
    package = tmp_path / "kvpress_aqua"
    for folder in ("util", "core", "cli"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "cache.py").write_text("")
    (package / "cli" / "main.py").write_text("")
    (package / "util" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..core.cache import X\n\n"
        "def f():\n    from ..cli import main\n")
    bad = _against_the_order(_graph(package))
    assert [b.split(" (")[0] for b in bad] == ["kvpress_aqua.util.bad:3 imports kvpress_aqua.core.cache",
                                               "kvpress_aqua.util.bad:6 imports kvpress_aqua.cli.main"]
