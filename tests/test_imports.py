"""The package's imports form no circle: between modules, and between the folders of its layout.

Every import counts, the ones inside functions too (an import deferred to keep a command fast
is still a dependency). Read from the source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tag_lightning

PACKAGE = Path(tag_lightning.__file__).resolve().parent
LAYERS = (  # the package docstring's order: each imports only from the ones before it
    ("tag_lightning.errors", "tag_lightning.images", "tag_lightning.boxes", "tag_lightning.resources"),
    ("tag_lightning.au",), ("tag_lightning.answers",), ("tag_lightning.grounding",), ("tag_lightning.data",),
    ("tag_lightning.traces",), ("tag_lightning.models",), ("tag_lightning.commands",),
)


def module_name(path: Path) -> str:
    parts = ("tag_lightning", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def owning_module(dotted: str) -> str | None:
    """The package module that `dotted` (a module, or a name inside one) lives in."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(path: Path) -> set[str]:
    """The package modules that the module at `path` imports (`from a import b` may name module b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (owning_module(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(filter(None, (owning_module(f"{node.module}.{alias.name}") for alias in node.names)))
    return found


def module_graph() -> dict[str, set[str]]:
    """Each module's imports, without itself and without the package roots above it (an `__init__`
    runs before its modules, importing them is not a dependency of theirs)."""
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {other for other in imports_of(path) if other != name and not name.startswith(other + ".")}
    return graph


def folder_of(module: str) -> str:
    """The layout's unit a module belongs to: its folder under the package, or itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2])


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as the path that closes it (first node repeated at the end), else None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state and (circle := visit(other)):
                return circle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_walk_sees_imports_inside_functions_and_from_package_imports():
    graph = module_graph()
    assert "tag_lightning.commands.training" in graph["tag_lightning.commands.cli"]  # imported inside main()
    assert "tag_lightning.traces.inflight" in graph["tag_lightning.traces.builder"]  # `from tag_lightning.traces import inflight`
    assert "tag_lightning.au.taxonomy" in graph["tag_lightning.grounding.claims"]


def test_the_circle_finder_finds_a_circle_through_others():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_two_modules_import_each_other_directly_or_through_others():
    circle = find_circle(module_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_folders_import_in_one_direction():
    folders: dict[str, set[str]] = {}
    for module, imported in module_graph().items():
        mine = folder_of(module)
        folders.setdefault(mine, set()).update(folder_of(other) for other in imported if folder_of(other) != mine)
    circle = find_circle(folders)
    assert circle is None, "folders importing each other: " + " -> ".join(circle)


def test_each_folder_imports_only_from_the_ones_before_it_in_the_package_docstring():
    layer_of = {unit: number for number, units in enumerate(LAYERS) for unit in units}
    assert set(layer_of) == {folder_of(module) for module in MODULES} - {"tag_lightning"}  # every folder placed
    against = sorted(f"{module} imports {other}" for module, imported in module_graph().items() for other in imported
                     if module != "tag_lightning" and layer_of[folder_of(other)] >= layer_of[folder_of(module)]
                     and folder_of(other) != folder_of(module))
    assert not against, "against the layout's order: " + "; ".join(against)
