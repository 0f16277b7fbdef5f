"""The package's layers, read from its source with `ast`: no cycles, no import against the layers.

    ground    trlm/{recipe,stage,artifacts,data_spec,base_model}.py, the recipes and data specs
      <- training  trlm/training/: the engine both trainers share
      <- stages    stages/: the stages and the registry (ground, engine and eval; never the run
                   bookkeeping, the flows, the CLI, Prefect or MLflow)
      <- runs      trlm/runs/: lineage, stage runs, tracking, artifact store, import graph
      <- flows     flows/: orchestration
      <- cli       trlm/cli.py
    eval/ stands alone (ground only); trlm/{servers,process_setup,prefect_db}.py (host) too, under the run
    bookkeeping (which asks servers.py whether the tracking server is the work dir's own), flows and the CLI.
"""

from __future__ import annotations

import ast

import pytest

from trlm.runs.import_graph import direct_imports, import_closure, module_file, package_modules

MODULES = package_modules()


LAYERS = (
    ("trlm.training", "training"),
    ("trlm.stages", "stages"),
    ("trlm.runs", "runs"),
    ("trlm.flows", "flows"),
    ("trlm.eval", "eval"),
    ("trlm.servers", "host"),
    ("trlm.process_setup", "host"),
    ("trlm.prefect_db", "host"),
    ("trlm.cli", "cli"),
)


def layer(module: str) -> str:
    for prefix, name in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "ground"


ALLOWED = {
    "ground": {"ground"},
    "training": {"ground", "training"},
    "eval": {"ground", "eval"},
    "host": {"ground", "host"},
    "stages": {"ground", "training", "eval", "stages"},
    "runs": {"ground", "training", "eval", "stages", "host", "runs"},
    "flows": {"ground", "training", "eval", "stages", "runs", "host", "flows"},
    "cli": {"ground", "training", "eval", "stages", "runs", "host", "flows", "cli"},
}
PACKAGES = {"trlm", "trlm.training", "trlm.runs", "trlm.stages", "trlm.flows", "trlm.eval", "trlm.recipes", "trlm.data_specs"}
GROUND = ("trlm.recipe", "trlm.stage", "trlm.artifacts", "trlm.data_spec", "trlm.base_model")


def test_the_package_is_found_from_source():
    assert {"trlm.recipe", "trlm.training.loop", "trlm.runs.lineage", "trlm.stages.sft", "trlm.stages.data_prep.chat_spans",
            "trlm.flows.pipeline", "trlm.eval.harness", "trlm.cli"} <= set(MODULES)


def test_every_module_has_a_layer_and_the_ground_is_small():
    assert sorted(m for m in MODULES if layer(m) == "ground" and m not in PACKAGES) == sorted(GROUND)


@pytest.mark.parametrize("module", MODULES)
def test_imports_follow_the_layers(module):
    wrong = sorted(t for t in direct_imports(module) if t not in PACKAGES and layer(t) not in ALLOWED[layer(module)])
    assert not wrong, f"{module} ({layer(module)}) imports {wrong}, against the layers"


def test_the_ground_and_the_lineage_import_no_stage_module():
    for module in (*GROUND, "trlm.runs.lineage"):
        assert not [m for m in import_closure(module) if m.startswith("trlm.stages.") or m.startswith("trlm.flows.")], module


def _third_party(module: str) -> set[str]:
    tree = ast.parse(module_file(module).read_bytes())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) in ("ground", "training", "stages", "eval")])
def test_stages_and_what_they_import_never_import_prefect_or_mlflow(module):
    assert not _third_party(module) & {"prefect", "mlflow"}, module


def test_no_import_cycles():
    graph = {m: {t for t in direct_imports(m) if t in MODULES} for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_detector_sees_a_function_local_import(tmp_path, monkeypatch):
    """Imports inside functions count (a cycle hidden that way is still a cycle)."""
    pkg = tmp_path / "trlm_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import trlm.runs.import_graph as graph

    monkeypatch.setattr(graph, "PACKAGE", "trlm_probe")
    (pkg / "a.py").write_text("import trlm_probe.b\n")
    (pkg / "b.py").write_text("def f():\n    from trlm_probe import a\n")
    assert "trlm_probe.b" in graph.direct_imports("trlm_probe.a")
    assert "trlm_probe.a" in graph.direct_imports("trlm_probe.b")
