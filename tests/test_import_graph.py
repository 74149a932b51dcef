"""The import graph keeps the architecture the tree shows (teasr_core/__init__.py): no import circles
among the modules of teasr_core, nodes/ or train/, no module borrowing another's underscore names,
each room of teasr_core importing only the rooms below it, teasr_core importing nothing of nodes/ or
train/ and train/ nothing of nodes/.

Read with `ast` from the sources (imports inside functions count too), so nothing is imported to check.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("teasr_core", "nodes", "train")
# What each room of teasr_core may import from teasr_core besides itself (teasr_core/__init__.py says why).
MAY_IMPORT = {
    "teasr_core": set(),                        # the package itself: the version
    "teasr_core.tiling": set(),
    "teasr_core.sampling": set(),
    "teasr_core.safetensors_io": set(),
    "teasr_core.network": set(),
    "teasr_core.codecs": {"teasr_core.tiling", "teasr_core.safetensors_io"},
    "teasr_core.formats": {"teasr_core", "teasr_core.network", "teasr_core.sampling", "teasr_core.safetensors_io",
                           "teasr_core.codecs"},
    "teasr_core.upscale": {"teasr_core.codecs", "teasr_core.formats", "teasr_core.network", "teasr_core.sampling",
                           "teasr_core.tiling"},
    "teasr_core.eval": {"teasr_core.codecs", "teasr_core.upscale"},
}
ENTRY_POINT = "teasr_core.__main__"            # the command line may import every room


@dataclass(frozen=True)
class Import:
    source: str      # importing module
    target: str      # imported module
    name: str        # the name taken from it ("" for `import target`)
    line: int


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import; the repository root is the pack's top package (nodes/
    reaches the core as `..teasr_core`), so climbing to it leaves the bare name."""
    if not level:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def imports(root: Path, packages=PACKAGES) -> list[Import]:
    """Every import statement of the packages that names one of their own modules."""
    modules = module_files(root, packages)
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(module, alias.name, "", node.lineno) for alias in node.names if alias.name in modules]
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, is_package, node.level, node.module)
                for alias in node.names:
                    submodule = f"{target}.{alias.name}" if target else alias.name
                    if submodule in modules:          # `from package import module`
                        found.append(Import(module, submodule, "", node.lineno))
                    elif target in modules:
                        found.append(Import(module, target, alias.name, node.lineno))
    return found


def borrowed_private_names(found: list[Import]) -> list[str]:
    """`from other import _name` (dunders like __version__ are public by convention)."""
    return [f"{i.source}:{i.line} takes {i.name} from {i.target}" for i in found
            if i.name.startswith("_") and not i.name.startswith("__") and i.target != i.source]


def cycles(found: list[Import], within: str = "teasr_core") -> list[list[str]]:
    """The import circles among the modules of `within`: strongly connected components (Tarjan) of more
    than one module, or a module importing itself."""
    graph: dict[str, set[str]] = {}
    for i in found:
        if i.source.split(".")[0] == within and i.target.split(".")[0] == within:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def room(module: str) -> str:
    """The room a teasr_core module lives in: its sub-package, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def crossings(found: list[Import]) -> list[str]:
    """Imports that break the layering: a room reaching a room it may not, the core reaching nodes/ or
    train/, train/ reaching nodes/."""
    wrong = []
    for i in found:
        source, target = i.source.split(".")[0], i.target.split(".")[0]
        where = f"{i.source}:{i.line} imports {i.target}"
        if source == "teasr_core" and target in ("nodes", "train"):
            wrong.append(f"{where} (teasr_core imports nothing of nodes/ or train/)")
        elif source == "train" and target == "nodes":
            wrong.append(f"{where} (train/ imports teasr_core, never nodes/)")
        elif source == target == "teasr_core" and i.source != ENTRY_POINT:
            mine, theirs = room(i.source), room(i.target)
            if mine != theirs and theirs not in MAY_IMPORT.get(mine, set()):
                wrong.append(f"{where} ({mine} may import {sorted(MAY_IMPORT.get(mine, ())) or 'nothing of teasr_core'})")
    return wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    assert cycles(imports(REPO), within=package) == []


def test_no_module_borrows_another_modules_private_names():
    assert borrowed_private_names(imports(REPO)) == []


def test_rooms_import_only_the_rooms_below_them():
    found = imports(REPO)
    assert crossings(found) == []
    rooms = {room(m) for m in module_files(REPO, ("teasr_core",)) if m != ENTRY_POINT}
    assert rooms == set(MAY_IMPORT), "a room was added or removed: say what it may import in MAY_IMPORT"


def test_the_graph_sees_imports_inside_functions_and_across_the_pack():
    """The checks are only as good as the graph: lazy imports and nodes/'s `..teasr_core` are in it."""
    found = {(i.source, i.target) for i in imports(REPO)}
    assert ("teasr_core.__main__", "teasr_core.formats.dual_lora") in found       # inside a function
    assert ("nodes.loader", "teasr_core.formats.load") in found                   # from ..teasr_core.formats.load
    assert ("teasr_core.formats.checkpoint", "teasr_core") in found                # from .. import __version__


@pytest.fixture
def planted(tmp_path) -> Path:
    """A package `teasr_core` with a cycle through a function-level import, a borrowed private name and a
    room reaching above itself."""
    files = {
        "teasr_core/__init__.py": "",
        "teasr_core/tiling.py": "def plan():\n    from .codecs.codec import encode\n",
        "teasr_core/codecs/__init__.py": "",
        "teasr_core/codecs/codec.py": "from ..tiling import plan\n\ndef encode():\n    pass\n",
        "teasr_core/codecs/pixel.py": "from .codec import _helper\n",
        "teasr_core/network/__init__.py": "",
        "teasr_core/network/model.py": "from ..upscale import pipeline\n",
        "teasr_core/upscale/__init__.py": "",
        "teasr_core/upscale/pipeline.py": "import teasr_core.network.model\n",
        "train/__init__.py": "",
        "train/loop.py": "from nodes.loader import Loader\n",
        "nodes/__init__.py": "",
        "nodes/loader.py": "from ..teasr_core.codecs import codec\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checks_fail_on_a_planted_cycle_and_a_borrowed_private_name(planted):
    found = imports(planted)
    assert cycles(found) == [["teasr_core.codecs.codec", "teasr_core.tiling"],
                             ["teasr_core.network.model", "teasr_core.upscale.pipeline"]]
    assert borrowed_private_names(found) == ["teasr_core.codecs.pixel:1 takes _helper from teasr_core.codecs.codec"]
    assert ("nodes.loader", "teasr_core.codecs.codec") in {(i.source, i.target) for i in found}
    wrong = crossings(found)
    assert any(w.startswith("teasr_core.tiling:2 imports teasr_core.codecs.codec") for w in wrong)
    assert any(w.startswith("teasr_core.network.model:1 imports teasr_core.upscale.pipeline") for w in wrong)
    assert any(w.startswith("train.loop:1 imports nodes.loader") for w in wrong)
    assert not any(w.startswith("teasr_core.upscale.pipeline") for w in wrong)   # upscale may import network
