"""The package's shape, checked: imports point one way, commands form one tier, files stay small,
and each shared mechanism has one owner.

Read from the source (AST), so a function-level import counts like any other: it hides a circle
from Python, which runs it late, but not from a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xcit_ssl

PACKAGE = Path(xcit_ssl.__file__).parent
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports, anywhere in its body (``from .x import y`` counts as
    ``.x``, and as ``.x.y`` when ``y`` is itself a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check below can fail: a planted circle of three modules is reported whole."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_commands_form_the_top_tier() -> None:
    """Nothing but cli.py and the commands themselves imports a command module."""
    importers = {
        (name, target) for name, targets in GRAPH.items() for target in targets
        if target.startswith("xcit_ssl.commands") and not name.startswith("xcit_ssl.commands") and name != "xcit_ssl.cli"
    }  # fmt: skip
    assert importers == set()


def test_ground_floor_imports_no_upper_tier() -> None:
    """errors, console, files, devices, config and schedules sit under everything else."""
    ground = {"xcit_ssl.errors", "xcit_ssl.console", "xcit_ssl.files", "xcit_ssl.devices", "xcit_ssl.config",
              "xcit_ssl.schedules"}  # fmt: skip
    for name in ground:
        assert GRAPH[name] <= ground, f"{name} imports {sorted(GRAPH[name] - ground)}"


SECOND_TIER_PREFIXES = ("xcit_ssl.models", "xcit_ssl.losses", "xcit_ssl.data.transforms", "xcit_ssl.data.images",
                        "xcit_ssl.data.photometric_kernels")  # fmt: skip


def test_second_tier_imports_only_the_ground_floor() -> None:
    """Backbones, losses, image files and transforms build on the ground floor and on each other,
    never on methods, data modules, evaluation, runs or commands."""
    ground = {"xcit_ssl", "xcit_ssl.errors", "xcit_ssl.console", "xcit_ssl.files", "xcit_ssl.devices", "xcit_ssl.config",
              "xcit_ssl.schedules", "xcit_ssl.data"}  # fmt: skip
    second = [name for name in MODULES if name.startswith(SECOND_TIER_PREFIXES)]
    assert len(second) > 10
    for name in second:
        higher = {t for t in GRAPH[name] if t not in ground and not t.startswith(SECOND_TIER_PREFIXES)}
        assert higher == set(), f"{name} imports {sorted(higher)}"


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_third_tier_imports_lightning() -> None:
    """The ground floor, models and losses are plain PyTorch: a backbone or a loss is usable
    (and importable) without Lightning."""
    lower = [name for name in MODULES if name.count(".") and name.split(".")[1] in ("models", "losses", "errors", "console", "files",
                                                                 "devices", "config", "schedules")]  # fmt: skip
    assert len(lower) > 10
    users = [name for name in lower if {"lightning", "pytorch_lightning"} & _third_party(MODULES[name])]
    assert users == []


def test_files_stay_small() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_one_owner_for_atomic_writes() -> None:
    """A rename into place appears in xcit_ssl/files.py only; every writer goes through it."""
    renames = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename"):
                receiver = node.func.value
                if isinstance(receiver, ast.Name) and receiver.id == "os":
                    renames.append(f"{name}:{node.lineno}")
    assert renames and all(r.startswith("xcit_ssl.files:") for r in renames), renames


def test_import_xcit_ssl_loads_no_torch() -> None:
    code = "import sys, xcit_ssl, xcit_ssl.cli; assert 'torch' not in sys.modules, 'torch'; print(xcit_ssl.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "create_backbone" in out and "load_backbone" in out


_HELP_ALL = """
import contextlib, io, sys
from xcit_ssl.cli import HANDLERS, main
for command in HANDLERS:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main([command, "--help"])
    except SystemExit as stop:  # argparse's help exits
        code = stop.code or 0
    print(command, code, len(out.getvalue()), "usage" in out.getvalue().lower() or "xcit-ssl" in out.getvalue(),
          file=sys.stderr)
"""


def test_every_command_answers_help() -> None:
    """``xcit-ssl COMMAND --help`` prints its usage and exits 0, for every command of the table
    (one process for all: most of the cost is importing Lightning once)."""
    from xcit_ssl.cli import HANDLERS

    result = subprocess.run([sys.executable, "-c", _HELP_ALL], capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "100"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = {line.split()[0]: line.split()[1:] for line in result.stderr.splitlines() if line.split()[:1] and line.split()[0] in HANDLERS}
    assert set(answers) == set(HANDLERS), result.stderr[-3000:]
    for command, (code, size, usage) in answers.items():
        assert (code, usage) == ("0", "True") and int(size) > 100, (command, code, size, usage)


def test_every_shipped_recipe_resolves_with_print_config(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """``xcit-ssl fit --recipe NAME --print_config`` prints a config naming the recipe's method and
    data module for every recipe we ship: class paths and keys still resolve after a move."""
    from xcit_ssl.cli import main
    from xcit_ssl.config import list_recipes

    names = [name for name, _ in list_recipes()]
    assert len(names) > 20
    for name in names:
        monkeypatch.setattr(sys, "argv", ["xcit-ssl"])  # fit rewrites sys.argv for Lightning's launcher
        assert main(["fit", "--recipe", name, "--print_config"]) == 0, name
        printed = capsys.readouterr().out
        assert "class_path: xcit_ssl.methods." in printed and "class_path: xcit_ssl.data." in printed, name
