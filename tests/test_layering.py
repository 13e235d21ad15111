"""The package's subpackages depend on each other one way only.

Every `import` in llminfer is read from the source (module level and inside functions; `if TYPE_CHECKING:` blocks
excepted, they never run), mapped to the subpackage it comes from and goes to, and checked against the layers
below: an edge may only point to the same layer or a lower one, and the graph of subpackages has no cycle. The
CLI sits on top: no library module imports it.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import llminfer

PACKAGE = Path(llminfer.__file__).parent

# lowest first; a subpackage (or top-level module) may import from its own layer or the ones before it
LAYERS = [
    {"errors", "files", "schemes", "_lazy", "architectures", "config"},
    {"tokenizer", "ops"},
    {"layers"},
    {"loading", "kv_cache"},
    {"quantization"},
    {"model"},
    {"parallel"},
    {"engine"},
    {"perplexity", "server", "export", "lite"},
    {"cli", "__main__", "__init__"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str:
    """llminfer.engine.llm -> engine; llminfer.perplexity -> perplexity; llminfer -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(file: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in the file that runs (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree)
               if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for node in ast.walk(block)}
    package = module_name(file) if file.name == "__init__.py" else module_name(file).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                found.append((node.module, node.lineno))
    return [(name, line) for name, line in found if name == "llminfer" or name.startswith("llminfer.")]


def dependency_edges() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> where, for every import crossing between two units of the package."""
    edges = defaultdict(list)
    for file in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(file))
        for target_module, line in imported_modules(file):
            target = unit_of(target_module)
            if target != source:
                edges[source, target].append(f"{file.relative_to(PACKAGE.parent)}:{line}")
    return edges


EDGES = dependency_edges()


def test_the_walker_sees_imports_at_module_level_and_inside_functions():
    assert ("engine", "model") in EDGES  # module level: the engine runs a model
    assert any(edge for edge in EDGES[("cli", "quantization")])  # the quantize command imports inside its function
    assert ("model", "engine") not in EDGES


def test_every_unit_of_the_package_has_a_layer():
    units = {unit_of(module_name(f)) for f in PACKAGE.rglob("*.py")}
    assert units - set(LAYER_OF) == set(), "add the new subpackage to LAYERS"


@pytest.mark.parametrize("edge", sorted(EDGES), ids=lambda e: f"{e[0]}->{e[1]}")
def test_imports_point_down_the_layers(edge):
    source, target = edge
    assert LAYER_OF[target] <= LAYER_OF[source], (
        f"{source} (layer {LAYER_OF[source]}) imports {target} (layer {LAYER_OF[target]}) at {EDGES[edge][0]}")


def import_cycles(edges) -> list[str]:
    """Every cycle a depth-first walk of the subpackage graph meets, as 'a -> b -> a (where, where)'."""
    graph = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
    visiting, done, cycles = [], set(), []

    def visit(unit):
        if unit in visiting:
            cycle = visiting[visiting.index(unit):] + [unit]
            where = [edges[a, b][0] for a, b in zip(cycle, cycle[1:])]
            cycles.append(f"{' -> '.join(cycle)} ({', '.join(where)})")
            return
        if unit in done:
            return
        visiting.append(unit)
        for target in sorted(graph[unit]):
            visit(target)
        visiting.pop()
        done.add(unit)

    for unit in sorted(graph):
        visit(unit)
    return cycles


def test_no_cycle_between_subpackages():
    assert import_cycles(EDGES) == []


def test_the_cycle_check_finds_a_cycle():
    edges = dict(EDGES)
    edges["model", "engine"] = ["llminfer/model/base.py:1"]  # what CausalLM.generate importing the engine was
    assert any(cycle.startswith("engine -> model -> engine") for cycle in import_cycles(edges))


def test_library_modules_never_import_the_cli():
    offenders = [where for (source, target), places in EDGES.items() if target == "cli" and source != "__main__"
                 for where in places]
    assert offenders == []
