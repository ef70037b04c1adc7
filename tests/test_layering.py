"""The import layering of docs/design.md, read from the code's own imports (ast; nothing is imported).

runtime/, passes/ and train/ are stages: they never import the API, the CLI or the pipeline that
drive them (absolute or relative imports, at module level or inside functions), and the package's
import graph has no cycles.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparsify"
STAGES = ("sparsify.runtime", "sparsify.passes", "sparsify.train")
ABOVE = ("sparsify.api", "sparsify.cli", "sparsify.pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The sparsify modules ``path`` (module ``name``) imports, anywhere in it; ``from . import x`` names x's module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name imported from a module stands for that module
                t = t.rpartition(".")[0]
            if t.startswith("sparsify") and t != name:
                out.add(t)
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for target in imported(path, name, set(mods)):
            if not (name.startswith(target + ".")):  # a module importing its own package's __init__ is not an edge up
                g.add_edge(name, target)
    return g


def test_the_reader_sees_relative_absolute_and_function_level_imports(tmp_path):
    known = {"sparsify", "sparsify.api", "sparsify.passes", "sparsify.passes.x", "sparsify.cli", "sparsify.pipeline"}
    src = tmp_path / "x.py"
    src.write_text("from .. import api\n"
                   "def f():\n    from ..cli import app\n    import sparsify.pipeline\n")
    found = imported(src, "sparsify.passes.x", known)
    assert found == {"sparsify", "sparsify.api", "sparsify.cli", "sparsify.pipeline"}


def test_the_graph_holds_the_known_edges():
    g = import_graph()
    assert g.has_edge("sparsify.api", "sparsify.rundir")
    assert g.has_edge("sparsify.rundir", "sparsify.replay")      # load_run's lazy import
    assert g.has_edge("sparsify.pipeline", "sparsify.runtime.bench")
    assert len(g) > 50


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_the_api_cli_or_pipeline(stage):
    g = import_graph()
    bad = sorted((m, t) for m, t in g.edges if (m == stage or m.startswith(stage + "."))
                 and any(t == a or t.startswith(a + ".") for a in ABOVE))
    assert not bad, f"{stage} imports what drives it: {bad}"


def test_replay_sits_below_the_api():
    g = import_graph()
    below = nx.descendants(g, "sparsify.rundir") | nx.descendants(g, "sparsify.replay")
    assert not below & {m for m in g if m.startswith(ABOVE)}


def test_the_package_import_graph_has_no_cycles():
    """Packages as nodes (sparsify.passes.rules.ops -> sparsify.passes), top-level modules as themselves."""
    g = import_graph()
    packages = nx.DiGraph()

    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])

    packages.add_nodes_from({unit(m) for m in g})
    packages.add_edges_from((unit(a), unit(b)) for a, b in g.edges if unit(a) != unit(b))
    cycles = list(nx.simple_cycles(packages))
    assert not cycles, f"import cycles between sparsify's modules/packages: {cycles}"


LAYERS = {  # docs/design.md, "Layers": a module imports only from its own layer or below
    5: ("sparsify", "sparsify.__main__"),
    4: ("sparsify.cli",),
    3: ("sparsify.pipeline", "sparsify.study"),
    2: ("sparsify.api",),
    1: ("sparsify.runtime", "sparsify.train", "sparsify.rundir", "sparsify.replay", "sparsify.methods"),
    0: ("sparsify.passes", "sparsify.models", "sparsify.zoo", "sparsify.report", "sparsify.nn", "sparsify.profiles",
        "sparsify.weights", "sparsify._io", "sparsify.errors", "sparsify.machine"),
}


def _layer(module: str) -> int:
    if module in LAYERS[5]:
        return 5
    return next(k for k, prefixes in LAYERS.items() if k < 5 and any(
        module == p or module.startswith(p + ".") for p in prefixes))


def test_no_import_runs_up_the_layers_of_the_design():
    g = import_graph()
    up = sorted((a, b) for a, b in g.edges if _layer(b) > _layer(a))
    assert not up, f"imports from a lower layer to a higher one (see docs/design.md): {up}"
