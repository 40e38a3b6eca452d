"""The project's import structure: no import cycle between any two of its modules (a lazy import
inside a function counts: it is a cycle the day someone hoists it), and the layering that the
package docstrings promise — each ``launch/`` subpackage imports only the ``launch`` packages
its ``__init__`` lists after "May import:", nothing below ``launch/`` imports a command, and the
libraries are layered (``LIBRARIES``: each imports only those before it, none imports ``launch``);
model math never imports distributed code.

The walk reads the source (``ast``), so it runs in milliseconds and imports nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("plugins", "text_sources", "launch", "data_pipeline", "tokenizer")
# The libraries below launch/, lowest first: each may import only those before it.
LIBRARIES = ("plugins", "text_sources", "tokenizer", "data_pipeline")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the top-level ``packages`` of ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions included). ``from P
    import x`` is the module ``P.x`` when there is one, else ``P``; importing a module also runs the
    ``__init__`` of each package above it, except the importer's own packages (already running)."""
    is_package = path.name == "__init__.py"
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1 + is_package)}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a module a.b.c, or a name in a.b
                target = target.rpartition(".")[0]
            parts = target.split(".") if target else []
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own - {name}
    return found & set(modules)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def allowed_launch_packages(root: Path) -> dict[str, set[str]]:
    """``launch.X`` -> the launch packages its ``__init__`` docstring allows after "May import:"."""
    out = {}
    for init in sorted((root / "launch").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        match = re.search(r"May import:\s*(.*?)\.?\s*$", doc, re.S)
        assert match, f"{init}: the docstring must say what the package may import ('May import: ...')"
        listed = set(re.findall(r"launch\.\w+", match.group(1)))
        out[f"launch.{init.parent.name}"] = listed
    return out


def layering_violations(root: Path, graph: dict[str, set[str]]) -> list[str]:
    rules = allowed_launch_packages(root)
    problems = []
    for module, targets in sorted(graph.items()):
        top = module.split(".")[0]
        package = ".".join(module.split(".")[:2])
        for target in sorted(targets):
            target_package = ".".join(target.split(".")[:2])
            target_top = target.split(".")[0]
            if top != "launch" and target_top == "launch":
                problems.append(f"{module} imports {target}: the libraries never import launch")
            elif top in LIBRARIES and target_top in LIBRARIES and LIBRARIES.index(target_top) > LIBRARIES.index(top):
                problems.append(f"{module} imports {target}: {top} sits below {target_top} "
                                f"(libraries, lowest first: {', '.join(LIBRARIES)})")
            elif package in rules and target.startswith("launch.") and target_package != package \
                    and target_package not in rules[package]:
                problems.append(f"{module} imports {target}: {package} may import only "
                                f"{', '.join(sorted(rules[package])) or 'nothing else in launch'}")
            if module.startswith("launch.") and package in rules and target_package not in rules \
                    and target.startswith("launch."):
                problems.append(f"{module} imports the command {target}: machinery never imports a command")
    return problems


def test_no_module_of_the_project_is_in_an_import_cycle():
    assert find_cycle(import_graph(ROOT)) is None, f"import cycle: {' -> '.join(find_cycle(import_graph(ROOT)))}"


def test_launch_packages_import_only_what_their_docstrings_allow():
    graph = import_graph(ROOT)
    assert layering_violations(ROOT, graph) == []
    assert set(allowed_launch_packages(ROOT)) >= {"launch.config", "launch.training", "launch.evaluation",
                                                    "launch.planning", "launch.reporting"}


def test_launch_keeps_only_commands_at_its_top():
    """Every module directly in launch/ is a command: it runs as ``python -m launch.X`` (a ``main``
    and a ``__main__`` guard)."""
    for path in sorted((ROOT / "launch").glob("*.py")):
        if path.name == "__init__.py":
            continue
        source = path.read_text(encoding="utf-8")
        assert "def main(" in source and 'if __name__ == "__main__":' in source, f"{path}: not a command"


def test_model_math_never_imports_distributed_code():
    for path in sorted((ROOT / "plugins" / "model").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from) (torch\.distributed|plugins\.parallel)\b", source, re.M), path


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_walk_finds_a_lazy_cycle_and_a_layering_breach(tmp_path):
    """The checks above can fail: a cycle through a function-level relative import (the shape of the
    old data_pipeline jobs <-> prepare circle), a package importing what its docstring does not allow
    and a library importing one above it (the shape of the old tokenizer.train -> data_pipeline.sources)."""
    _write(tmp_path, {
        "data_pipeline/__init__.py": "",
        "data_pipeline/prepare.py": "def main():\n    from .jobs import run\n",
        "data_pipeline/jobs.py": "def run():\n    from . import prepare\n",
        "launch/__init__.py": "",
        "launch/config/__init__.py": '"""Config.\n\nMay import: nothing else in launch.\n"""\n',
        "launch/config/run.py": "from launch.training.loop import x\n",
        "launch/training/__init__.py": '"""Loop.\n\nMay import: launch.config.\n"""\n',
        "launch/training/loop.py": "from launch.pretrain import main\nx = 1\n",
        "launch/pretrain.py": "from launch.training import loop\n",
        "tokenizer/__init__.py": "",
        "tokenizer/train.py": "from data_pipeline.prepare import main\n",
    })
    graph = import_graph(tmp_path, ("data_pipeline", "launch", "tokenizer"))
    assert find_cycle({k: v for k, v in graph.items() if k.startswith("data_pipeline")}) in (
        ["data_pipeline.jobs", "data_pipeline.prepare", "data_pipeline.jobs"],
        ["data_pipeline.prepare", "data_pipeline.jobs", "data_pipeline.prepare"])
    problems = layering_violations(tmp_path, graph)
    assert any(p.startswith("launch.config.run imports launch.training.loop") for p in problems)
    assert any(p.startswith("launch.training.loop imports the command launch.pretrain") for p in problems)
    assert any(p.startswith("tokenizer.train imports data_pipeline.prepare: tokenizer sits below data_pipeline")
               for p in problems)


@pytest.mark.parametrize("module,expected", [
    ("launch.training.trainer", {"launch.checkpointing.checkpointer", "launch.training.validation"}),
    ("data_pipeline.prepare", {"data_pipeline.jobs", "tokenizer.load"}),
])
def test_the_walk_sees_relative_absolute_and_lazy_imports(module, expected):
    assert expected <= import_graph(ROOT)[module]
