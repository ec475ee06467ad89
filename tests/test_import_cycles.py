"""No import cycle between finetune_kit's parts: every import counts, inside functions too."""

import ast
from collections import defaultdict
from pathlib import Path

import finetune_kit

PACKAGE = Path(finetune_kit.__file__).parent
Edges = dict[str, dict[str, list[str]]]  # part -> part it imports -> where ("llm/local_server.py:127")


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """The subpackage or top-level module a module belongs to: `llm`, `training`, `cli`…"""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The finetune_kit modules an import statement names, `from finetune_kit import llm` included."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])])
    if base == "finetune_kit":
        return [f"finetune_kit.{alias.name}" for alias in node.names]
    return [base]


def import_edges(package: Path = PACKAGE) -> Edges:
    """Every import between two parts of the package, wherever in a module it is written."""
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(node, module, path.name == "__init__.py"):
                if target.split(".")[0] != "finetune_kit":
                    continue
                source_part, target_part = _part(module), _part(target)
                if source_part != target_part:
                    where = f"{path.relative_to(package)}:{node.lineno}"
                    edges[source_part][target_part].append(where)
    return edges


def find_cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected groups of two or more parts (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _describe(cycle: list[str], edges: Edges) -> str:
    members = set(cycle)
    return "; ".join(
        f"{source} -> {target} ({', '.join(sites)})"
        for source in cycle
        for target, sites in sorted(edges.get(source, {}).items())
        if target in members
    )


def test_no_import_cycle_between_parts() -> None:
    edges = import_edges()
    assert [_describe(cycle, edges) for cycle in find_cycles(edges)] == []


def test_llm_and_training_do_not_import_each_other_both_ways() -> None:
    edges = import_edges()
    assert not ("training" in edges["llm"] and "llm" in edges["training"]), (
        edges["llm"]["training"],
        edges["training"]["llm"],
    )


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    package = tmp_path / "finetune_kit"
    (package / "llm").mkdir(parents=True)
    (package / "training").mkdir()
    for path in ["__init__.py", "llm/__init__.py", "training/__init__.py"]:
        (package / path).write_text("")
    (package / "llm" / "server.py").write_text("def f():\n    from finetune_kit.training import jobs\n")
    (package / "training" / "jobs.py").write_text("from ..llm import server\n")
    edges = import_edges(package)
    assert find_cycles(edges) == [["llm", "training"]]
    assert (
        _describe(["llm", "training"], edges)
        == "llm -> training (llm/server.py:2); training -> llm (training/jobs.py:1)"
    )
