"""The import rules the README states, checked on the source (every import, lazy ones too).

rehamot/ is cut into parts: the foundation (the top-level library modules), the subpackages
(data, models, motion, loss, evaluation, retrieval, training), the two documented re-exports
and the entry points (thin command files). Each part may import only the parts below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "rehamot"
ENTRY_POINTS = {"rehamot.train", "rehamot.evaluate", "rehamot.search", "rehamot.render",
                "rehamot.evaluate_generation"}
# documented import paths -> the modules they re-export
REEXPORTS = {"rehamot.kinematics": {"rehamot.motion.kinematics", "rehamot.motion.features", "rehamot.motion.skeletons"},
             "rehamot.search_index": {"rehamot.retrieval.index"}}
FOUNDATION = {"rehamot.config", "rehamot.checksums", "rehamot.distributed", "rehamot.progress"}
SUBPACKAGES = {"data", "models", "motion", "loss", "evaluation", "retrieval", "training"}
# What each part may import besides itself (the README's table of parts says the same).
MAY_IMPORT = {
    "foundation": {"foundation"},
    "data": {"foundation"},
    "models": {"foundation"},
    "motion": set(),
    "loss": {"foundation"},
    "evaluation": {"foundation", "data", "models", "motion"},
    "retrieval": {"foundation", "data", "models", "motion", "evaluation"},
    "training": {"foundation", "data", "models", "motion", "loss", "evaluation"},
}
NUMPY_ONLY = {"rehamot.evaluation.retrieval_metrics", "rehamot.evaluation.generation_metrics",
              "rehamot.motion.kinematics", "rehamot.motion.features", "rehamot.motion.skeletons",
              "rehamot.motion.physics"}  # numpy (and scipy): no torch, rich or matplotlib
NO_DISTRIBUTED = {"rehamot.loss.chunked", "rehamot.loss.dense", "rehamot.loss.pairs", "rehamot.loss.cores",
                  "rehamot.loss.negative_search",
                  "rehamot.evaluation.retrieval_metrics", "rehamot.models",
                  "rehamot.motion", "rehamot.data"}


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


def part_of(module: str) -> str | None:
    """The part a module (or an imported name) belongs to; None for the package root itself."""
    if module in ENTRY_POINTS:
        return "entry"
    if module in REEXPORTS:
        return "reexport"
    if module in FOUNDATION or any(module.startswith(f + ".") for f in FOUNDATION):
        return "foundation"
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "rehamot" and parts[1] in SUBPACKAGES:
        return parts[1]
    return None


def in_family(module: str, prefixes: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imports_of(family: set[str], prefix: str) -> dict[str, set[str]]:
    found = {m: {i for i in imports(m) if i == prefix or i.startswith(prefix + ".")} for m in MODULES
             if in_family(m, family)}
    return {m: names for m, names in found.items() if names}


def test_every_module_is_seen():
    assert {"rehamot.train", "rehamot.loss.chunked", "rehamot.models.motion_encoder", "rehamot.data.pipeline",
            "rehamot.training.trainer", "rehamot.retrieval.index"} <= set(MODULES)


def test_every_module_belongs_to_a_part():
    assert [m for m in MODULES if m != "rehamot" and part_of(m) is None] == []


def test_top_level_holds_only_the_foundation_re_exports_and_entry_points():
    top = {m for m in MODULES if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir()}
    assert top == FOUNDATION | set(REEXPORTS) | ENTRY_POINTS


def test_no_package_shares_a_name_with_an_entry_point():
    assert {e.split(".")[1] for e in ENTRY_POINTS} & {p.name for p in PACKAGE.iterdir() if p.is_dir()} == set()


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_each_part_imports_only_the_parts_below_it(part):
    allowed = MAY_IMPORT[part] | {part}
    offenders = {}
    for module in MODULES:
        if part_of(module) != part:
            continue
        wrong = {i for i in imports(module) if i.startswith("rehamot.") and part_of(i) not in allowed}
        if wrong:
            offenders[module] = wrong
    assert offenders == {}


def test_entry_points_are_thin_and_import_one_cli_each():
    for entry in ENTRY_POINTS:
        rehamot_imports = {i for i in imports(entry) if i.startswith("rehamot")}
        assert len(rehamot_imports) == 2, (entry, rehamot_imports)  # `from rehamot.X.cli import main`
        assert all(".cli" in i or "_cli" in i for i in rehamot_imports), (entry, rehamot_imports)
        assert len(MODULES[entry].read_text(encoding="utf-8").splitlines()) <= 15


def test_re_exports_import_only_their_module():
    for module, targets in REEXPORTS.items():
        assert {i for i in imports(module) if i.startswith("rehamot") and not in_family(i, targets)} == set()


@pytest.mark.parametrize("prefix", ["torch.distributed", "accelerate", "deepspeed"])
def test_pure_modules_import_no_distributed_code(prefix):
    assert imports_of(NO_DISTRIBUTED, prefix) == {}


@pytest.mark.parametrize("prefix", ["torch", "rich", "matplotlib", "accelerate"])
def test_numpy_only_modules(prefix):
    assert imports_of(NUMPY_ONLY, prefix) == {}


def test_motion_imports_no_torch():
    assert imports_of({"rehamot.motion"}, "torch") == {}


def test_config_imports_no_torch():
    assert imports_of({"rehamot.config"}, "torch") == {}


def test_objective_alone_knows_losses_and_distributed():
    both = {m for m in MODULES
            if "rehamot.distributed" in imports(m) and any(i.startswith("rehamot.loss.cores") for i in imports(m))}
    assert both == {"rehamot.loss.objective"}


def test_data_never_imports_models():
    assert imports_of({"rehamot.data"}, "rehamot.models") == {}


@pytest.mark.parametrize("prefix", ["accelerate", "deepspeed"])
def test_only_the_accelerator_module_imports_accelerate(prefix):
    assert set(imports_of(set(MODULES), prefix)) <= {"rehamot.training.accelerator"}


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


def test_no_module_imports_a_private_name_of_another_module():
    private = {}
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        names = {f"{node.module}.{alias.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rehamot")
                 for alias in node.names if alias.name.startswith("_")}
        if names:
            private[module] = names
    assert private == {}


def test_no_sys_path_edits_in_the_package():
    assert [m for m, p in MODULES.items() if "sys.path" in p.read_text(encoding="utf-8")] == []
