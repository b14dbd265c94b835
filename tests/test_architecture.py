"""The layout holds: no import cycles, arrows point down, the first stage stands alone, modules stay small.

Every module's imports are read with `ast` (also those inside functions), so a late import that
hides a cycle or an upward arrow is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGES = ("common", "autoencoder", "ldm")
MAX_LINES = 500

# Rooms from the bottom up: a module may import from its own room and from rooms of lower layers.
# The two data paths, image -> autoencoder -> latent -> noise -> denoiser -> loss and
# prompt -> text encoder -> context -> sampler -> decoder -> image, run upwards through these layers.
LAYERS = [
    ("common",),
    ("autoencoder",),
    ("ldm.images",),
    ("ldm.diffusion", "ldm.denoisers", "ldm.text", "ldm.data"),
    ("ldm.samplers", "ldm.conditioner"),
    ("ldm.config",),
    ("ldm.model",),
    ("ldm.pipeline", "ldm.formats", "ldm.lora"),
    ("ldm.training",),
    ("ldm.cli", "ldm"),
    ("ldm.server",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:  # `from ldm import samplers` imports the module ldm.samplers
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    return {m for m in found if m in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def room(module: str) -> tuple[int, str]:
    """(layer, room) of a module: the longest room name that is a prefix of it."""
    best = None
    for layer, rooms in enumerate(LAYERS):
        for r in rooms:
            if (module == r or module.startswith(r + ".")) and (best is None or len(r) > len(best[1])):
                best = (layer, r)
    assert best is not None, f"{module} belongs to no room of LAYERS; add it there"
    return best


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Depth-first search with colours: reaching a grey (open) module again closes a cycle."""
    colour, stack, cycles = {}, [], []

    def visit(module: str) -> None:
        colour[module] = "grey"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if colour.get(target) == "grey":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in colour:
                visit(target)
        stack.pop()
        colour[module] = "black"

    for module in sorted(graph):
        if module not in colour:
            visit(module)
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports into another room of the same or a higher layer."""
    upward = []
    for module, targets in graph.items():
        layer, own = room(module)
        for target in targets:
            target_layer, target_room = room(target)
            if target_room != own and target_layer >= layer:
                upward.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    return sorted(upward)


def test_there_are_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_first_stage_and_the_foundations_import_nothing_above_them(graph):
    upward = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
              if (m.startswith("autoencoder") and t.split(".")[0] == "ldm")
              or (m.startswith("common") and t.split(".")[0] != "common")]
    assert not upward, "\n".join(upward)


def test_imports_point_down_the_layers(graph):
    upward = upward_imports(graph)
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_arrow():
    graph = {"ldm.model": {"ldm.pipeline"}, "ldm.pipeline": {"ldm.model"}, "ldm.denoisers.unet": {"ldm.text"}}
    assert find_cycles(graph) == ["ldm.model -> ldm.pipeline -> ldm.model"]
    assert upward_imports(graph) == ["ldm.denoisers.unet (layer 3) imports ldm.text (layer 3)",
                                     "ldm.model (layer 6) imports ldm.pipeline (layer 7)"]


def test_models_never_import_the_pipeline(graph):
    assert "ldm.pipeline" not in graph["ldm.model"]
    assert not any(t == "ldm.pipeline" for m, ts in graph.items() if m.startswith("ldm.denoisers") for t in ts)


@pytest.mark.parametrize("folder", [*PACKAGES, "tools", "bench"])
def test_modules_stay_small(folder):
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted((REPO / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by concept):\n" + "\n".join(long)


def test_architecture_section_of_the_readme_names_every_room():
    readme = (REPO / "README.md").read_text()
    assert "\n## Architecture\n" in readme
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    for rooms in LAYERS:
        for r in rooms:
            leaf = r.rsplit(".", 1)[-1]
            name = leaf + "/" if (REPO / r.replace(".", "/")).is_dir() else leaf + ".py"
            assert name in section, f"the README's architecture section does not name {r} ({name})"
    for module in project_modules():
        if "." in module and module.count(".") == 1 and (REPO / module.replace(".", "/")).is_dir():
            assert module.rsplit(".", 1)[-1] + "/" in section, f"{module} is a folder the README does not show"
