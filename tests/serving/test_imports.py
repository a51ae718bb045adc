"""Imports point down: the runtime imports no layer above it, exporters never import the server,
and no factorlm modules form an import cycle.

Read from the source (every ``import`` statement, function-level ones included), so a lazy
import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import factorlm

SRC = Path(factorlm.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the factorlm modules that ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "factorlm" or name.startswith("factorlm.")}


def test_imports_of_resolves_relative_imports():
    onnx_engine = imports_of(SRC / "serving" / "onnx_engine.py")
    assert "factorlm.exporters.onnx.generator" in onnx_engine and "factorlm.serving.torch_engine" in onnx_engine
    assert "factorlm.serving.onnx_engine" in imports_of(SRC / "serving" / "engines.py")


def _offenders(layer: str, forbidden: tuple[str, ...]) -> set[str]:
    return {f"{_module_name(p)} -> {name}" for p in sorted((SRC / layer).rglob("*.py"))
            for name in imports_of(p) for f in forbidden if name == f"factorlm.{f}" or name.startswith(f"factorlm.{f}.")}


def test_the_runtime_imports_no_layer_above_it():
    offenders = _offenders("runtime", ("compressor", "serving", "exporters", "bench", "cli", "eval"))
    assert not offenders, sorted(offenders)


def test_the_server_engine_factory_lives_in_serving():
    assert not (SRC / "exporters" / "onnx" / "serving.py").exists()
    classes = {node.name for p in (SRC / "exporters").rglob("*.py") for node in ast.parse(p.read_text()).body
               if isinstance(node, ast.ClassDef)}
    assert "OrtCausalLM" not in classes


def test_exporters_never_import_serving():
    offenders = _offenders("exporters", ("serving",))
    assert not offenders, sorted(offenders)


def test_serving_modules_have_no_import_cycle():
    modules = {_module_name(p): p for p in (SRC / "serving").glob("*.py")}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    graph["factorlm.serving"] = set()  # the package's lazy __init__ maps names; it is not an edge
    assert "factorlm.serving.app" not in graph["factorlm.serving.streaming"]
    assert "factorlm.serving.streaming" not in graph["factorlm.serving.app"]

    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_importing_the_onnx_exporter_loads_no_server_module():
    code = ("import sys, factorlm.exporters.onnx, factorlm.exporters.onnx.generator, factorlm.exporters.onnx.export; "
            "print(sorted(m for m in sys.modules if m.startswith('factorlm.serving')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # one interpreter per module: a few minutes
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each factorlm module imports first in its own interpreter: no import cycle hides behind import order."""
    names = sorted(_module_name(p) for p in SRC.rglob("*.py")
                   if "__pycache__" not in p.parts and p.name != "__main__.py")  # __main__ runs the CLI
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
            "    if r.returncode:\n"
            "        bad.append(name + ': ' + (r.stderr.strip().splitlines() or ['?'])[-1])\n"
            "print('\\n'.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=1800)
    failures = [line for line in out.stdout.splitlines() if line and "No module named" not in line]
    assert not failures, failures


def test_no_import_cycle_among_all_factorlm_modules():
    modules = {_module_name(p): p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name and not name.startswith(m + ".")}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
