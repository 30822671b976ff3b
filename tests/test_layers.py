"""The import rule of DESIGN.md, held by walking every import of the installed package with `ast` (imports inside
functions included): base < store < components < recipes < apps; a file imports only files of its own layer or
lower; a recipe imports no other recipe; model files import no training or data code; stage one imports neither
stage two nor evaluation; no import cycles."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent
LAYERS = ("base", "store", "component", "recipe", "app")
BASE = {"vtn", "vtn.errors", "vtn.config", "vtn.progress", "vtn.paths", "vtn.runtime", "vtn.plots"}
RECIPES = {"vtn.extract.job", "vtn.temporal.train", "vtn.temporal.finetune", "vtn.temporal.sweep",
           "vtn.temporal.probe", "vtn.evaluate.run", "vtn.evaluate.predict"}
APPS = {"vtn.cli", "vtn.__main__", "vtn.demo", "vtn.ablate", "vtn.synth"}
# The model: VTN, its config and its attention backends. They may use checkpoints (loading weights), nothing of
# training or data.
MODEL_PREFIXES = ("vtn.temporal.model", "vtn.temporal.longformer", "vtn.temporal.hf", "vtn.temporal.attention")


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in APPS or module.endswith(".cli") or module.startswith("vtn.bench"):
        return "app"
    if module in RECIPES:
        return "recipe"
    if module.startswith("vtn.store"):
        return "store"
    return "component"


def modules() -> dict[str, Path]:
    """Every module of the package (dotted name -> file), from pyproject's package folders."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in dirs.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    edges = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in candidates:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not mods[t].name == "__init__.py":
                    targets.add(t)
        edges[name] = targets
    return edges


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in edges.items():
        for dst in sorted(targets):
            a, b = layer(src), layer(dst)
            if LAYERS.index(b) > LAYERS.index(a):
                out.append(f"{src} ({a}) imports {dst} ({b}), a higher layer")
            elif a == b == "recipe":
                out.append(f"recipe {src} imports recipe {dst}; move what they share into a component")
            if src.startswith(MODEL_PREFIXES) and layer(dst) != "base" and not (
                    dst.startswith(MODEL_PREFIXES) or dst == "vtn.temporal.checkpoint"):
                out.append(f"model file {src} imports {dst}, which is not model code")
            if src.startswith("vtn.extract") and layer(src) != "app" and dst.startswith(("vtn.temporal", "vtn.evaluate")):
                out.append(f"stage one's {src} imports {dst}: the flow is extract -> store <- temporal <- evaluate")
    return out + [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other (depth-first search)."""
    found, state = [], {}

    def visit(v, path):
        state[v] = "open"
        for w in sorted(edges.get(v, ())):
            if state.get(w) == "open":
                found.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = "done"

    for v in sorted(edges):
        if v not in state:
            visit(v, [v])
    return found


def test_the_checker_finds_each_kind_of_violation():
    edges = {"vtn.store.reader": {"vtn.temporal.data"}, "vtn.temporal.sweep": {"vtn.temporal.train"},
             "vtn.temporal.model": {"vtn.temporal.data"}, "vtn.extract.decode": {"vtn.temporal.metrics"},
             "vtn.temporal.data": {"vtn.temporal.metrics"}, "vtn.temporal.metrics": {"vtn.temporal.data"}}
    found = "\n".join(violations(edges))
    assert "vtn.store.reader (store) imports vtn.temporal.data (component)" in found
    assert "recipe vtn.temporal.sweep imports recipe vtn.temporal.train" in found
    assert "model file vtn.temporal.model imports vtn.temporal.data" in found
    assert "stage one's vtn.extract.decode imports vtn.temporal.metrics" in found
    assert ("import cycle: vtn.temporal.metrics -> vtn.temporal.data -> vtn.temporal.metrics" in found
            or "import cycle: vtn.temporal.data -> vtn.temporal.metrics -> vtn.temporal.data" in found)


def test_every_import_of_the_package_follows_the_layers():
    mods = modules()
    assert {"vtn.temporal.train", "vtn.store.reader", "vtn.cli"} <= set(mods)  # the walk found the package
    assert not (RECIPES - set(mods)), "a recipe named here no longer exists; update RECIPES"
    assert violations(imports(mods)) == []
