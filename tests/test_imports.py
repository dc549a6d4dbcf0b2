"""Dependencies run one way: build code (talkrt.build_engines) imports the runtime, never the reverse.

Two checks: importing every runtime module in a fresh interpreter leaves ``talkrt.build_engines``
out of ``sys.modules``, and no import statement under runtime/ or kernels/ (lazy ones inside
functions included, relative ones resolved, ``importlib.import_module("...")`` too) names it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = "talkrt.build_engines"
PACKAGES = {"runtime": "talkrt", "kernels": "talkrt.kernels"}   # folder -> import name (pyproject)
MUST_IMPORT = {"talkrt.engines.select", "talkrt.pipeline", "talkrt.session", "talkrt.cli"}

PROBE = """
import importlib, json, sys
errors = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # reported, not raised: every module is tried
        errors[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"errors": errors, "build": sorted(m for m in sys.modules if m == %r or m.startswith(%r))}))
""" % (BUILD, BUILD + ".")


def module_name(path: Path) -> str:
    """``runtime/engines/select.py`` -> ``talkrt.engines.select``; ``runtime/__init__.py`` -> ``talkrt``."""
    rel = path.relative_to(REPO)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def runtime_files() -> list[Path]:
    """Every .py file of the runtime and kernel packages."""
    return sorted(p for folder in PACKAGES for p in (REPO / folder).rglob("*.py"))


def imports_in_process(modules: list[str], cwd: Path) -> dict:
    """Import ``modules`` in a fresh interpreter; ``{"errors": {module: message}, "build": [...]}``."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _names_build(name: str | None) -> bool:
    return name is not None and (name == BUILD or name.startswith(BUILD + "."))


def build_imports(source: str, module: str, is_package: bool = False) -> list[int]:
    """Line numbers of statements in ``source`` (module ``module``) that import ``talkrt.build_engines``."""
    package = module if is_package else module.rpartition(".")[0]
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hits = any(_names_build(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            hits = _names_build(target) or any(_names_build(f"{target}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            hits = called in {"import_module", "__import__"} and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and _names_build(a.value)
                for a in node.args[:1])
        else:
            continue
        if hits:
            lines.append(node.lineno)
    return lines


def test_runtime_modules_import_without_the_build_package(tmp_path):
    modules = [module_name(p) for p in runtime_files()]
    assert MUST_IMPORT <= set(modules)
    result = imports_in_process(modules, tmp_path)       # cwd outside the checkout: only the installed names
    assert result["errors"] == {}
    assert result["build"] == [], f"importing the runtime loaded {result['build']}"


def test_the_probe_sees_a_build_import(tmp_path):
    result = imports_in_process(["talkrt.engines.select", "talkrt.build_engines.cli"], tmp_path)
    assert result["errors"] == {} and BUILD in result["build"] and f"{BUILD}.cli" in result["build"]


def test_no_runtime_or_kernel_source_names_the_build_package():
    found = {}
    for path in runtime_files():
        lines = build_imports(path.read_text(), module_name(path), path.name == "__init__.py")
        if lines:
            found[str(path.relative_to(REPO))] = lines
    assert found == {}, f"runtime code imports {BUILD}: {found}"


@pytest.mark.parametrize("source, module", [
    ("import talkrt.build_engines.cli", "talkrt.pipeline"),
    ("def f():\n    from talkrt.build_engines.specs import export_specs\n", "talkrt.engines.select"),
    ("from talkrt import build_engines", "talkrt.cli"),
    ("from ..build_engines import cli", "talkrt.engines.select"),
    ("from .. import build_engines", "talkrt.engines.select"),
    ("import importlib\nimportlib.import_module('talkrt.build_engines.cli')", "talkrt.session"),
])
def test_the_static_check_catches_every_import_form(source, module):
    assert build_imports(source, module) != []


@pytest.mark.parametrize("source, module", [
    ("from talkrt.engines.specs import export_specs", "talkrt.engines.select"),
    ("from . import specs", "talkrt.engines.select"),
    ("MSG = 'run python -m talkrt.build_engines'", "talkrt.engines.manifest"),
])
def test_the_static_check_passes_other_imports(source, module):
    assert build_imports(source, module) == []
