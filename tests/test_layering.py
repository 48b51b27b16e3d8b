"""The package's layering, read from the source (ast), at any depth (an import inside a function counts too):

- parallel/ never imports model/;
- no two modules import each other, even indirectly;
- no module outside parallel/ uses torch.distributed: no `import torch.distributed`, no
  `from torch.distributed import ...`, no `from torch import distributed`, and no `torch.distributed`
  attribute reached through a plain `import torch` (parallel/world.py owns the default process group,
  parallel/comm.py the collectives).
"""
import ast
from pathlib import Path

PACKAGE = "megatron_llama"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE



def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement of the file names: modules, and module.attribute for `from` imports."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's __init__ counts as a module)."""
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    return {name: {target for target in imported_names(path) if target in modules and target != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_parallel_imports_nothing_from_model():
    graph = import_graph()
    edges = sorted((module, target) for module, targets in graph.items() if module.startswith(f"{PACKAGE}.parallel")
                   for target in targets if target.startswith(f"{PACKAGE}.model"))
    assert edges == [], f"parallel/ must not depend on model/ (pass chunks and a forward step instead): {edges}"


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    found = cycles(graph)
    edges = sorted((module, target) for component in found for module in component
                   for target in graph[module] if target in component)
    assert found == [], f"modules that import each other (directly or through others): {found}; edges: {edges}"


def test_the_cycle_finder_sees_an_indirect_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def uses_torch_distributed(path: Path) -> list[int]:
    """Lines of the file that import torch.distributed (in any spelling) or reach it as torch.distributed."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            hit = any(alias.name == "torch.distributed" or alias.name.startswith("torch.distributed.")
                      for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            hit = module == "torch.distributed" or module.startswith("torch.distributed.") or (
                module == "torch" and any(alias.name == "distributed" for alias in node.names))
        elif isinstance(node, ast.Attribute):
            hit = node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch"
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_no_module_outside_parallel_uses_torch_distributed():
    offenders = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).as_posix()
        if relative.startswith(f"{PACKAGE}/parallel/"):
            continue
        lines = uses_torch_distributed(path)
        if lines:
            offenders[relative] = lines
    assert offenders == {}, (f"torch.distributed outside parallel/ (file: lines): {offenders}; use "
                             f"parallel/world.py (the default process group) or parallel/comm.py (collectives)")


def test_the_distributed_finder_sees_every_spelling(tmp_path):
    source = tmp_path / "spellings.py"
    source.write_text("import torch.distributed as dist\nfrom torch import distributed\n"
                      "from torch.distributed import ReduceOp\nimport torch\n\n\ndef f():\n"
                      "    return torch.distributed.get_rank()\n")
    assert uses_torch_distributed(source) == [1, 2, 3, 8]
