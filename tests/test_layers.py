"""The driver's layers, checked from the source (every import, at the top of a module or
inside a function): each module imports only modules of its own layer or the layers below,
the modules import each other in no circle, no `_private` name crosses a module, and
workers/ imports nothing of the orchestrator (nor Ray)."""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# layer of each package or module of orchestrator/ (the longest matching prefix wins); README
# "Layout of the code" says what each holds
LAYERS = {
    "orchestrator.errors": 1, "orchestrator.uris": 1, "orchestrator.settings": 1,
    "orchestrator.storage": 2, "orchestrator.metrics": 2, "orchestrator.plots": 2,
    "orchestrator.tracking": 3, "orchestrator.scheduling": 3,
    "orchestrator.api": 4, "orchestrator.runtime": 4,
    "orchestrator.stages": 5,
    "orchestrator.analyses": 6,
    "orchestrator.pipeline": 7,
    "orchestrator.cli": 8, "orchestrator.__main__": 8, "orchestrator": 8,
    "hydra_plugins": 8,
}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def modules(top: str) -> dict[str, str]:
    """{module name: path} of every .py under the package `top`."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(REPO, top)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


ALL = {**modules("orchestrator"), **modules("hydra_plugins"), **modules("workers")}


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) of every import in `name`,
    relative imports resolved; `from pkg import mod` counts as importing pkg.mod."""
    tree = ast.parse(open(ALL[name]).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[:-node.level] if not ALL[name].endswith("__init__.py") \
                    else name.split(".")[:len(name.split(".")) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in ALL else (base, a.name, node.lineno))
    return out


def internal(target: str) -> str | None:
    """The module of ours that an import of `target` loads (None: a library)."""
    while target and target not in ALL:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> dict[str, set[str]]:
    return {m: {t for t in (internal(x) for x, _, _ in imports(m)) if t and t != m} for m in ALL}


def test_each_layer_imports_only_its_own_and_the_layers_below():
    upward = []
    for m in ALL:
        if not m.startswith(("orchestrator", "hydra_plugins")):
            continue
        for target, _, line in imports(m):
            t = internal(target)
            if t and t.startswith("orchestrator") and layer(t) > layer(m):
                upward.append(f"{ALL[m]}:{line}: {m} (layer {layer(m)}) imports {t} (layer {layer(t)})")
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    g = graph()
    circles, state = [], {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_no_private_name_crosses_a_module():
    crossing = []
    for m, path in ALL.items():
        tree = ast.parse(open(path).read())
        aliases = {}          # local name -> our module it names
        for target, what, line in imports(m):
            t = internal(target)
            if t and t != m and what is not None and what.startswith("_") and not what.startswith("__"):
                crossing.append(f"{path}:{line}: imports {t}.{what}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in ALL:
                        aliases[a.asname or a.name] = sub
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in ALL and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                crossing.append(f"{path}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("forbidden", ["orchestrator", "ray", "hydra_plugins"])
def test_workers_import_no_orchestrator_and_no_ray(forbidden):
    found = [f"{ALL[m]}:{line}: {target}" for m in ALL if m.startswith("workers")
             for target, _, line in imports(m) if target == forbidden or target.startswith(forbidden + ".")]
    assert not found, "\n".join(found)


def test_the_registry_runs_the_stages_the_settings_name():
    """The stage names the `stage` setting allows (settings.schema.STAGES) are the pipeline's
    stages, in its order, and `all`."""
    from orchestrator.pipeline import STAGES
    from orchestrator.settings.schema import STAGES as NAMES
    assert ("all", *(s.name for s in STAGES)) == NAMES
