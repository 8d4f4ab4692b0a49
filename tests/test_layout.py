"""The layout: no import cycles (imports inside functions count), and the core (data, models,
metrics, distill, prune, compress, analysis, ...) imports neither Ray, MLflow nor the edge modules."""

import ast
from pathlib import Path

import pytest

FARM = Path(__file__).resolve().parents[1] / "farm"
#: The edges: Ray, MLflow, job stages, the CLI. Everything else in farm/ is core.
EDGE = {"farm.fanout", "farm.neuron_runs", "farm.pipeline", "farm.sweep", "farm.tracking", "farm.cli", "farm.analyze_job", "farm.plots",
        "farm.config", "farm.teacher_cli", "farm.submit"}
PACKAGES = ("farm.data", "farm.models", "farm.analysis")


def _modules() -> dict[str, Path]:
    out = {}
    for p in FARM.rglob("*.py"):
        name = ".".join(p.relative_to(FARM.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, modules) -> tuple[set[str], set[str]]:
    """(farm modules imported anywhere in the file, top-level third-party names imported)."""
    farm, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n in modules:
                farm.add(n)
            elif not n.startswith("farm"):
                other.add(n.split(".")[0])
    return farm, other


def _unit(module: str) -> str:
    """Cycles are counted between packages (farm.data, farm.models, ...) and top-level modules."""
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), module)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules_or_packages():
    modules = _modules()
    by_module = {m: _imports(p, modules)[0] - {m} for m, p in modules.items()}
    assert _cycles(by_module) == []
    units: dict[str, set[str]] = {}
    for m, deps in by_module.items():
        units.setdefault(_unit(m), set()).update(_unit(d) for d in deps if _unit(d) != _unit(m))
    assert _cycles(units) == []


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m not in EDGE and m != "farm"))
def test_the_core_imports_neither_ray_mlflow_nor_the_edges(module):
    modules = _modules()
    farm, other = _imports(modules[module], modules)
    assert not ({"ray", "mlflow"} & other), f"{module} imports {sorted({'ray', 'mlflow'} & other)}"
    assert not (farm & EDGE), f"{module} imports the edge modules {sorted(farm & EDGE)}"
