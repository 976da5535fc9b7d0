"""The import rules the README states, checked on the source (every import, lazy ones too).

An entry point is a module run as a command; the library is everything else in rehamot/.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "rehamot"
ENTRY_POINTS = {"rehamot.train", "rehamot.evaluate", "rehamot.search", "rehamot.render",
                "rehamot.evaluate_generation"}
NUMPY_ONLY = {"rehamot.metrics", "rehamot.generation_metrics", "rehamot.kinematics"}
NO_DISTRIBUTED = {"rehamot.losses", "rehamot.losses_reference", "rehamot.metrics", "rehamot.models"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> set[str]:
    """Every module name imported anywhere in the module (function-level imports included)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from rehamot import x`
    return names


def in_family(module: str, prefixes: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imports_of(family: set[str], prefix: str) -> dict[str, set[str]]:
    found = {m: {i for i in imports(m) if i == prefix or i.startswith(prefix + ".")} for m in MODULES
             if in_family(m, family)}
    return {m: names for m, names in found.items() if names}


def test_every_module_is_seen():
    assert {"rehamot.train", "rehamot.losses", "rehamot.models.motion_encoder", "rehamot.data.pipeline"} <= set(MODULES)


@pytest.mark.parametrize("prefix", ["torch.distributed", "accelerate", "deepspeed"])
def test_pure_modules_import_no_distributed_code(prefix):
    assert imports_of(NO_DISTRIBUTED, prefix) == {}


@pytest.mark.parametrize("prefix", ["torch", "rich", "matplotlib", "accelerate"])
def test_numpy_only_modules(prefix):
    assert imports_of(NUMPY_ONLY, prefix) == {}


def test_config_imports_no_torch():
    assert imports_of({"rehamot.config"}, "torch") == {}


def test_objective_alone_knows_losses_and_distributed():
    both = {m for m in MODULES
            if {"rehamot.losses", "rehamot.distributed"} <= {i.removesuffix(".losses_reference") for i in imports(m)}}
    assert both == {"rehamot.objective"}


def test_data_never_imports_models():
    assert imports_of({"rehamot.data"}, "rehamot.models") == {}


@pytest.mark.parametrize("prefix", ["accelerate", "deepspeed"])
def test_only_the_accelerator_module_imports_accelerate(prefix):
    assert set(imports_of(set(MODULES), prefix)) <= {"rehamot.accelerator"}


@pytest.mark.parametrize("prefix", ["shards", "tests", "benchmarks"])
def test_the_package_never_imports_scripts_or_tests(prefix):
    assert imports_of(set(MODULES), prefix) == {}


def test_entry_points_never_import_each_other_and_the_library_imports_none():
    offenders = {m: {i for i in imports(m) if i in ENTRY_POINTS and i != m} for m in MODULES}
    assert {m: names for m, names in offenders.items() if names} == {}


def test_no_module_acts_at_import_time():
    """No global warning filters, matplotlib backends or sys.path edits at module level."""
    acting = {"filterwarnings", "simplefilter", "use", "insert", "append"}
    found = []
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            for call in ast.walk(node) if isinstance(node, (ast.Expr, ast.If, ast.Assign)) else ():
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in acting:
                    found.append(f"{module}: {ast.unparse(call)[:60]}")
    assert found == []


def test_no_sys_path_edits_in_the_package():
    assert [m for m, p in MODULES.items() if "sys.path" in p.read_text(encoding="utf-8")] == []
