"""The package's shape: layers whose imports only point down, no import cycle, one place for the
command line, one exception family, one atomic writer, and modules small enough to read.

Everything is read with the standard library's `ast` from the source files, so a new cycle or an
upward import fails here before it confuses anyone. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "palm"

# Foundations -> model and its math -> recipe -> data -> state -> jobs -> commands. A module may
# import its own layer or lower ones; every module must be placed (a new one fails until it is).
LAYERS: dict[str, int] = {
    # 0 foundations: errors, files, HTTP fetching, config, distributed, measurement
    "palm.errors": 0,
    "palm.files": 0,
    "palm.fetch": 0,
    "palm.config": 0,
    "palm.distributed": 0,
    "palm.dtensor": 0,
    "palm.profiling": 0,
    # 1 the model and its math
    "palm.flops": 1,
    "palm.cpu_kernels": 1,
    "palm.loss": 1,
    "palm.kv_cache": 1,
    "palm.rope": 1,
    "palm.block_autograd": 1,
    "palm.attention_autograd": 1,
    "palm.model": 1,
    "palm.parallel": 1,
    "palm.tokenizer": 1,
    "palm.compiled_decoding": 1,
    "palm.sampling": 1,
    # 2 the recipe
    "palm.schedules": 2,
    "palm.adafactor_update": 2,
    "palm.optim": 2,
    "palm.guards": 2,
    # 3 data
    "palm.data": 3,
    "palm.data.corpus": 3,
    "palm.data.sources": 3,
    "palm.data.pack": 3,
    "palm.data.manifest": 3,
    "palm.data.loader": 3,
    "palm.data.pipeline": 3,
    "palm.data.splits": 3,
    "palm.data.prepared": 3,
    # 4 state
    "palm.checkpoint": 4,
    "palm.runs": 4,
    "palm.saving": 4,
    "palm.metrics": 4,
    "palm.hf": 4,  # transformers folders: runs.init_from reads them
    "palm.hf_tokenizer": 4,
    # 5 jobs and peers
    "palm.trainer": 5,
    "palm.perplexity": 5,
    "palm.memorization": 5,
    "palm.lm_eval_adapter": 5,
    "palm.interop": 5,
    "palm.hub": 5,
    "palm.pretrained": 5,
    "palm.plot": 5,
    "palm.simulate": 5,
    "palm.batching": 5,
    "palm.engine": 5,
    "palm.protocol": 5,
    "palm.serve": 5,
    # 6 commands
    "palm.cli": 6,
    "palm.cli.download": 6,
    "palm.cli.train": 6,
    "palm.cli.generate": 6,
    "palm.cli.evaluate": 6,
    "palm.cli.info": 6,
    "palm.cli.export": 6,
    "palm.cli.plot": 6,
    "palm.cli.serve": 6,
    "palm.__main__": 6,
    "palm": 6,  # the lazy public API (palm.PaLM, ...) may name anything
}
# What the data pipeline must never reach: the model, checkpoints, pretrained weights.
DATA_MAY_NOT_IMPORT = {
    "palm.model",
    "palm.loss",
    "palm.sampling",
    "palm.checkpoint",
    "palm.trainer",
    "palm.interop",
    "palm.hub",
    "palm.pretrained",
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return found


MODULES = modules()


def imports_of(tree: ast.Module) -> set[str]:
    """The palm modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from palm.data import loader` imports a submodule; `... import TokenWindows` the
            # package: take the submodule when one exists by that name.
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n == "palm" or n.startswith("palm."))
    return found


GRAPH = {name: imports_of(tree) - {name} for name, (_, tree) in MODULES.items()}


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYERS)) == [], "place new modules in LAYERS"
    assert sorted(set(LAYERS) - set(MODULES)) == [], "LAYERS names modules that do not exist"


def test_imports_only_point_down():
    upward = [
        f"{importer} (layer {LAYERS[importer]}) imports {imported} (layer {LAYERS[imported]})"
        for importer, targets in GRAPH.items()
        for imported in targets
        if imported in LAYERS and LAYERS[imported] > LAYERS[importer]
    ]
    assert upward == []


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Depth-first search over the whole graph; every back edge closes a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycle():
    assert find_cycles(GRAPH) == []


def test_the_cycle_check_finds_a_planted_cycle():
    graph = {name: set(targets) for name, targets in GRAPH.items()}
    graph["palm.errors"].add("palm.trainer")  # trainer -> ... -> errors -> trainer
    assert any("palm.errors -> palm.trainer" in c for c in find_cycles(graph))


def test_data_never_imports_the_model_checkpoints_or_pretrained():
    bad = {
        name: sorted(GRAPH[name] & DATA_MAY_NOT_IMPORT)
        for name in GRAPH
        if name == "palm.data" or name.startswith("palm.data.")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def _outside_main_guard(tree: ast.Module) -> list[ast.AST]:
    """Every node except those under `if __name__ == "__main__":`."""
    skip = set()
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            skip.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if id(n) not in skip]


def _is_command(name: str) -> bool:
    return name == "palm.cli" or name.startswith("palm.cli.") or name == "palm.__main__"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_commands_parse_arguments_and_exit(name):
    if _is_command(name):
        return
    tree = MODULES[name][1]
    offences = []
    for node in _outside_main_guard(tree):
        if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
            offences.append(f"line {node.lineno}: import argparse")
        if isinstance(node, ast.ImportFrom) and node.module == "argparse":
            offences.append(f"line {node.lineno}: from argparse import")
        if isinstance(node, ast.Attribute) and node.attr == "exit":
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                offences.append(f"line {node.lineno}: sys.exit")
        if isinstance(node, ast.Name) and node.id == "SystemExit":
            offences.append(f"line {node.lineno}: SystemExit")
    assert offences == []


# Built-in exceptions a library module may still raise: they signal a programming error in the
# caller's use of Python itself, not a failure for the user.
BUILTIN_ALLOWED = {"AttributeError", "NotImplementedError", "StopIteration", "KeyboardInterrupt"}
# palm.files mirrors the os module it wraps: its callers turn OSError into their own PalmError.
MODULE_ALLOWED = {"palm.files": {"OSError"}}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_failures_are_palm_errors(name):
    """Library code raises PalmError subclasses, so one handler maps them to exit codes."""
    import builtins

    tree = MODULES[name][1]
    offences = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and isinstance(getattr(builtins, exc.id, None), type):
            if exc.id not in BUILTIN_ALLOWED | MODULE_ALLOWED.get(name, set()):
                offences.append(f"line {node.lineno}: raise {exc.id}")
    assert offences == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_are_renamed_into_place_only_by_palm_files(name):
    if name == "palm.files":
        return
    offences = [
        f"line {node.lineno}: os.{node.attr}"
        for node in ast.walk(MODULES[name][1])
        if isinstance(node, ast.Attribute)
        and node.attr in ("replace", "rename", "renames")
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    ]
    assert offences == [], "write through palm.files (write_atomic / atomic_file / publish)"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_short_and_say_what_they_are_for(name):
    path, tree = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines; split it by concern"
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 5, f"{path}: needs a module docstring saying what it is for"


def test_root_scripts_are_thin_shims():
    root = PACKAGE.parent
    for script in ("download.py", "train.py", "generate.py", "evaluate.py"):
        tree = ast.parse((root / script).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported == {f"palm.cli.{script[:-3]}"}, script


def test_the_training_loop_fits_on_a_screen():
    """Trainer.fit is PaLM §5's loop as a table of contents: every step is a named call."""
    tree = MODULES["palm.trainer"][1]
    fit = next(
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "fit"
    )
    assert fit.end_lineno - fit.lineno + 1 <= 60
