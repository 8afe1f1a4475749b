"""The import graph: data flows preprocess -> loader <- training (which runs preprocess's code
on new scans to predict them), and no module circles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("preprocess", "loader", "training")


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for package in PACKAGES
        for path in (ROOT / package).glob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_two_modules_import_each_other_even_inside_a_function():
    graph = _imports()
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join([*path, module])}")
        if module in done or module.endswith(("__init__", "__main__")):
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_imports_follow_the_data_flow():
    for module, imported in _imports().items():
        package = module.split(".")[0]
        others = {name.split(".")[0] for name in imported} - {package}
        allowed = {
            "preprocess": {"loader"},
            "loader": set(),
            "training": {"loader", "preprocess"},  # predicting new scans preprocesses them
        }[package]
        assert others <= allowed, f"{module} imports {sorted(others - allowed)}"


# preprocess's rooms, lowest first: a module imports only from the layers before its own.
PREPROCESS_LAYERS = (
    ("errors", "splits", "series"),  # error kinds; splits; the DICOM series rule table (pure)
    ("volume", "slices", "shards", "discover"),  # one file, one cut, shard ids, finding files
    ("standard", "dicom", "writer"),  # the template, DICOM series, the store's writer
    ("settings",),  # Settings, RunOptions: every option
    ("scan", "find"),  # one scan to slices; the run's scans and labels
    ("workers",),  # the pool of processes that run `scan`
    ("pipeline",),  # the run: calls the rooms above
    ("cli",),  # python -m preprocess
)


def test_preprocess_modules_import_only_from_the_layers_below_their_own():
    layer_of = {
        f"preprocess.{name}": depth
        for depth, names in enumerate(PREPROCESS_LAYERS)
        for name in names
    }
    graph = _imports()
    modules = {m for m in graph if m.startswith("preprocess.")}
    modules -= {"preprocess.__init__", "preprocess.__main__"}
    assert modules == set(layer_of), "every module of preprocess has a layer"
    for module in sorted(modules):
        for imported in graph[module]:
            if imported.startswith("preprocess."):
                assert layer_of[imported] < layer_of[module], f"{module} imports {imported}"
