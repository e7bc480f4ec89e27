"""The project's import graph read from source (AST), the layer table of docs/ARCHITECTURE.md, and the
rules the architecture test checks. Independent of importing anything: only files are read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpe", "flows")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py in the packages (``pkg.__init__`` as ``pkg``)."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in p.parts:
                continue
            name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            out[name] = p
    return out


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _targets(node, current: str, files: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative import
            base = (
                current.split(".")[: -node.level]
                if not is_package(current, files)
                else current.split(".")[: len(current.split(".")) - node.level + 1]
            )
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [f"{mod}.{a.name}" for a in node.names] + [mod]
    else:
        return []
    out = []
    for n in names:
        while n and n not in files:
            n = n.rpartition(".")[0]
        if n:
            out.append(n)
    # "from mpe.stages import data" names mpe.stages.data; the package itself adds nothing then
    return out


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Edges module → module for every import statement anywhere in the file (function-local too).
    Edges to package ``__init__`` modules are dropped: they hold no logic (checked separately)."""
    files = files or module_files()
    graph = {m: set() for m in files if not is_package(m, files)}
    for m, path in files.items():
        if is_package(m, files):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for t in _targets(node, m, files):
                if t != m and not is_package(t, files):
                    graph[m].add(t)
    return graph


def layer_table(doc: Path = ROOT / "docs" / "ARCHITECTURE.md") -> list[tuple[str, list[str]]]:
    """``[(layer name, [module patterns])]`` in order, from the table in docs/ARCHITECTURE.md."""
    rows = []
    for line in doc.read_text().splitlines():
        m = re.match(r"\|\s*(\d+) (\w+)\s*\|(.*?)\|", line)
        if m:
            patterns = re.findall(r"`([^`]+)`", m.group(3))
            rows.append((m.group(2), [p if p.startswith("flows") else f"mpe/{p}" for p in patterns]))
    return rows


def layer_of(module: str, table) -> int | None:
    """The layer of ``module``: a pattern naming it exactly wins (a per-file exception), else the longest
    ``folder/*`` pattern it falls under."""
    path = module.replace(".", "/")
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(table):
        for pat in patterns:
            if path == pat:
                return i
            if pat.endswith("/*") and path.startswith(pat[:-1]) and len(pat) > best_len:
                best, best_len = i, len(pat)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(graph: dict[str, set[str]], table) -> list[str]:
    """Every breach of the layering rules, as readable lines (empty when the code keeps them)."""
    out = []
    for m in sorted(graph):
        if layer_of(m, table) is None:
            out.append(f"{m}: not placed in any layer of docs/ARCHITECTURE.md")
    for m in sorted(graph):
        lm = layer_of(m, table)
        for t in sorted(graph[m]):
            lt = layer_of(t, table)
            if lm is not None and lt is not None and lt > lm:
                out.append(f"{m} ({table[lm][0]}) imports {t} ({table[lt][0]}), a layer above it")
            if m.startswith("mpe.stages.") and t.startswith("mpe.stages."):
                out.append(f"stage {m} imports stage {t}")
            if t == "mpe.cli":
                out.append(f"{m} imports mpe.cli (nothing may)")
    for group in cycles(graph):
        out.append("import cycle: " + " -> ".join(group))
    return out


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


# Files a module reads as code without importing them: the pyfunc file is logged as the model's code.
FILE_EDGES = {"mpe.serving.mlflow_model": {"mpe.serving.pyfunc"}}


def stage_code_deps(graph: dict[str, set[str]], stage: str) -> set[str]:
    """The repository paths of every module ``mpe.stages.<stage>`` needs, transitively."""
    g = {m: graph[m] | FILE_EDGES.get(m, set()) for m in graph}
    return {m.replace(".", "/") + ".py" for m in closure(g, f"mpe.stages.{stage}")}


def _config_fields(cls):
    return getattr(cls, "model_fields", None) or {}


def params_keys(stage_file: Path) -> tuple[set[str], list[str]]:
    """The ``params.yaml`` keys a stage module reads (every ``params.a.b`` chain resolved against the
    config classes, stopping at the first attribute that is not a field), and the lines where the whole
    ``params`` object is used bare (passed on, so its keys cannot be read off the module)."""
    from mpe.config import Params

    tree = ast.parse(stage_file.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    keys, bare = set(), []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == "params"):
            continue
        chain, cur = [], node
        while isinstance(parents.get(cur), ast.Attribute) and parents[cur].value is cur:
            cur = parents[cur]
            chain.append(cur.attr)
        if not chain:
            if not isinstance(parents.get(node), ast.arg):
                bare.append(f"{stage_file.name}:{node.lineno}")
            continue
        cls, parts = Params, []
        for name in chain:
            field = _config_fields(cls).get(name)
            if field is None:
                break
            parts.append(field.alias or name)
            cls = field.annotation
        keys.add(".".join(parts) if parts else "(whole params)")
    return keys, bare


def uncovered_and_unused(read: set[str], declared: list[str]) -> tuple[set[str], set[str]]:
    """Keys read but covered by no declared key (a declared key covers itself and everything below it),
    and declared keys that nothing read falls under."""

    def covers(d, k):
        return k == d or k.startswith(d + ".")

    uncovered = {k for k in read if not any(covers(d, k) for d in declared)}
    unused = {d for d in declared if not any(covers(d, k) for k in read)}
    return uncovered, unused


def rewrite_dvc_code_deps(text: str, graph: dict[str, set[str]]) -> str:
    """``dvc.yaml`` with each stage's ``mpe/`` deps replaced by what its code imports (other deps, params,
    outs and comments kept as written). ``python -m tests.import_graph`` applies it."""
    out, stage, in_deps, pending = [], None, False, []

    def flush():
        nonlocal pending
        if in_deps:
            keep = [d for d in pending if not d.startswith("mpe/")]
            out.extend(f"      - {d}" for d in keep + sorted(stage_code_deps(graph, stage)))
        pending = []

    for line in text.splitlines():
        m_stage = re.match(r"^  (\w+):\s*$", line)
        m_item = re.match(r"^      - (\S+)\s*$", line)
        if in_deps and m_item:
            pending.append(m_item.group(1))
            continue
        if in_deps:
            flush()
            in_deps = False
        if m_stage:
            stage = m_stage.group(1)
        if re.match(r"^    deps:\s*$", line):
            in_deps = True
        out.append(line)
    flush()
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    dvc = ROOT / "dvc.yaml"
    dvc.write_text(rewrite_dvc_code_deps(dvc.read_text(), import_graph()))
    print(f"rewrote the mpe/ deps of {dvc}")
