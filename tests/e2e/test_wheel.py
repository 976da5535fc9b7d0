"""The package as users install it: a built wheel, not the editable checkout.

The wheel must hold every subpackage and its package data (the search page's files, TMR's id
lists), and the installed copy must answer the documented imports and commands.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, unpacked with pip into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("rehamot-*.whl")
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


def _run(installed: Path, code: str) -> subprocess.CompletedProcess:
    # PYTHONPATH comes before the editable install's finder; the cwd is not the checkout
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-c", code], cwd=installed.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def test_wheel_holds_every_subpackage_and_its_package_data(installed):
    (wheel,) = installed.parent.glob("rehamot-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("data", "models", "motion", "loss", "evaluation", "retrieval", "training"):
        assert f"rehamot/{package}/__init__.py" in names
    assert {"rehamot/retrieval/web/index.html", "rehamot/retrieval/web/app.js", "rehamot/retrieval/web/style.css"} <= names
    assert {"rehamot/evaluation/protocol_lists/humanml3d-nsim_test.txt",
            "rehamot/evaluation/protocol_lists/kitml-nsim_test.txt"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_installed_copy_answers_the_documented_imports(installed):
    code = """
import json
import rehamot
from rehamot import Evaluator, load_bundle
from rehamot.kinematics import features_to_joints
from rehamot.search_index import SearchIndex
from rehamot.evaluation.retrieval_metrics import nsim_ids
from rehamot.retrieval.server import WEB_DIR
print(json.dumps({"file": rehamot.__file__, "page": (WEB_DIR / "index.html").is_file(),
                  "nsim": len(nsim_ids("humanml3d")), "evaluator": Evaluator.__module__}))
"""
    out = _run(installed, code)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout)
    assert Path(info["file"]).is_relative_to(installed)  # the wheel's copy, not the checkout
    assert info["page"] and info["nsim"] == 100 and info["evaluator"] == "rehamot.evaluation.generation_eval"


def test_installed_commands_answer_help(installed):
    for module in ("rehamot.train", "rehamot.evaluate", "rehamot.search", "rehamot.render", "rehamot.evaluate_generation"):
        code = f"import runpy, sys; sys.argv = ['{module}', '--help']; runpy.run_module('{module}', run_name='__main__')"
        out = _run(installed, code)
        assert out.returncode == 0, (module, out.stderr[-2000:])
        assert "usage: rehamot-" in out.stdout or "rehamot-train [CONFIG.yaml]" in out.stdout
