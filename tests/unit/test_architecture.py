"""The layering of docs/ARCHITECTURE.md and the truth of dvc.yaml's deps, read from the source.

Each checker is also shown to fail on a breach injected into a copy of the graph or of dvc.yaml, so a
green run means the rules hold, not that the checker is blind."""

import ast
import copy

import pytest
import yaml

from tests.import_graph import (
    ROOT,
    import_graph,
    layer_table,
    module_files,
    params_keys,
    stage_code_deps,
    uncovered_and_unused,
    violations,
)

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


@pytest.fixture(scope="module")
def table():
    return layer_table()


def test_every_module_keeps_the_layering(graph, table):
    assert [name for name, _ in table] == ["foundation", "model", "services", "adapters", "stages", "top"]
    assert violations(graph, table) == []


@pytest.mark.parametrize(
    "edge,expect",
    [
        (("mpe.cache.store", "mpe.stages.train"), "a layer above it"),  # library importing a stage
        (("mpe.model.multi_prompt_clip", "mpe.cli"), "imports mpe.cli"),  # library importing the CLI
        (("mpe.evaluation.tasks", "flows.retrain"), "a layer above it"),  # library importing the flows
        (("mpe.stages.cache", "mpe.stages.evaluate"), "imports stage"),  # a stage importing a stage
        (("mpe.model.text.tower", "mpe.model.multi_prompt_clip"), "import cycle"),  # a cycle inside the model layer
    ],
)
def test_the_checker_fails_on_a_forbidden_import(graph, table, edge, expect):
    bad = copy.deepcopy(graph)
    bad[edge[0]].add(edge[1])
    assert any(expect in v for v in violations(bad, table)), violations(bad, table)


def test_an_unplaced_module_is_reported(graph, table):
    bad = {**graph, "mpe.utils2": set()}
    assert "mpe.utils2: not placed in any layer of docs/ARCHITECTURE.md" in violations(bad, table)


def _own_imports_only(nodes: list, package: str) -> bool:
    """Whether every import under ``nodes`` is from ``package``'s own modules (``typing`` for TYPE_CHECKING)."""
    imports = [n for node in nodes for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
    return all(isinstance(n, ast.ImportFrom) and (n.module or "").startswith(package + ".") for n in imports)


def _lazy_reexport(node, package: str) -> bool:
    """``if TYPE_CHECKING:`` re-exports, or a module ``__getattr__`` (PEP 562) that imports a name of the
    package's own modules on first use and raises AttributeError otherwise."""
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return _own_imports_only(node.body, package)
    if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
        return _own_imports_only(node.body, package)
    return False


def test_package_inits_hold_no_logic():
    """A package ``__init__`` holds a docstring, ``__version__``, and re-exports of its own public names
    (``from mpe.model import MultiPromptCLIP``, eager or lazy) with their ``__all__``: nothing that runs logic."""
    files = module_files()
    for name, path in files.items():
        if path.name != "__init__.py":
            continue
        body = ast.parse(path.read_text()).body
        for node in body:
            doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            assign = [t.id for t in node.targets] if isinstance(node, ast.Assign) else []
            names = assign in (["__version__"], ["__all__"])
            reexport = isinstance(node, ast.ImportFrom) and (node.module or "").startswith(name + ".")
            future = isinstance(node, ast.ImportFrom) and node.module in ("__future__", "typing")
            assert doc or names or reexport or future or _lazy_reexport(node, name), (
                f"{path}: a package __init__ holds a docstring, __version__ and "
                "re-exports of its own modules' names only"
            )


def _declared_code(stage: str) -> set[str]:
    return {d for d in DVC[stage]["deps"] if d.startswith("mpe/")}


def test_the_stage_list_is_the_stage_modules():
    from mpe.provenance.dvc import stage_names

    assert stage_names(ROOT) == list(DVC)
    for stage in DVC:
        assert (ROOT / "mpe" / "stages" / f"{stage}.py").exists(), stage
        assert DVC[stage]["cmd"] == f"mpe {stage.replace('_', '-')}"


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_code_deps_are_exactly_what_the_stage_imports(graph, stage):
    needed = stage_code_deps(graph, stage)
    declared = _declared_code(stage)
    assert not needed - declared, f"dvc.yaml stage {stage} misses deps: {sorted(needed - declared)}"
    assert not declared - needed, f"dvc.yaml stage {stage} lists code it never imports: {sorted(declared - needed)}"


@pytest.mark.parametrize("stage", list(DVC))
def test_dvc_params_are_exactly_the_keys_the_stage_reads(stage):
    read, bare = params_keys(ROOT / "mpe" / "stages" / f"{stage}.py")
    assert not bare, f"the whole params object is passed on at {bare}: pass the sections instead"
    uncovered, unused = uncovered_and_unused(read, DVC[stage]["params"])
    assert not uncovered, f"dvc.yaml stage {stage} does not list the params it reads: {sorted(uncovered)}"
    assert not unused, f"dvc.yaml stage {stage} lists params it never reads: {sorted(unused)}"


def test_the_deps_checkers_fail_on_a_missing_or_extra_dep(graph):
    needed = stage_code_deps(graph, "evaluate")
    assert "mpe/evaluation/plots.py" in needed and "mpe/evaluation/plots.py" not in stage_code_deps(graph, "cache")
    assert uncovered_and_unused({"cache.dtype", "seed"}, ["cache"]) == ({"seed"}, set())
    assert uncovered_and_unused({"cache.dtype"}, ["cache", "mlflow"]) == (set(), {"mlflow"})
    read, _ = params_keys(ROOT / "mpe" / "stages" / "evaluate.py")
    assert "evaluate.ks" in read and "model" not in read


def test_computed_states_are_never_deleted_by_dvc():
    outs = DVC["cache"]["outs"]
    assert outs == [{"cache": {"persist": True}}], outs


def test_every_param_dvc_tracks_is_written_in_the_shipped_params_file():
    """DVC refuses to run a stage whose listed param is absent from params.yaml, even when the config
    has a default for it (the shipped file is what `make run` reads)."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())

    def present(key: str) -> bool:
        node = shipped
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = {stage: [k for k in DVC[stage]["params"] if isinstance(k, str) and not present(k)] for stage in DVC}
    assert not any(missing.values()), f"params.yaml lacks keys dvc.yaml tracks: {missing}"


@pytest.mark.parametrize("flow_file", sorted(p.name for p in (ROOT / "flows").glob("*.py")))
def test_every_flow_file_imports_cleanly(flow_file):
    """Prefect loads a flow file it cannot import into a stand-in namespace (a missing name becomes None)
    and runs it: `from mpe import storage` left by a refactor failed only mid-suite. Imported here for real."""
    import runpy

    runpy.run_path(str(ROOT / "flows" / flow_file), run_name="flow_import_check")
