"""A two-source run leaves out the train motions that duplicate a val/test motion of any source,
lists them in RUN_DIR/leaks.json, reuses that report on resume and refuses a resume whose leak
settings changed (through `python rehamot/train.py`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, assert_refused, run_cli

from rehamot.data.reading import read_raw_motions

pytestmark = pytest.mark.slow


def train(overrides: list[str], check: bool = True):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, *overrides], check=check)


@pytest.fixture(scope="module")
def planted(demo_shards, tmp_path_factory) -> tuple[Path, str]:
    """A second corpus (the `manifest` source): 24 demo train motions and, in its train split too,
    an exact copy of a demo test motion."""
    folder = tmp_path_factory.mktemp("planted")
    (folder / "m").mkdir()
    test = read_raw_motions(str(demo_shards), "test")
    test_id = sorted(test)[2]
    records = [{"id": "planted", "motion": "m/planted.npy", "captions": ["a person copies a test motion"],
                "split": "train", "fps": 20}]
    np.save(folder / "m" / "planted.npy", test[test_id])
    for n, (sample_id, motion) in enumerate(sorted(read_raw_motions(str(demo_shards), "train").items())[:24]):
        np.save(folder / "m" / f"t{n}.npy", motion)
        records.append({"id": f"t{n}", "motion": f"m/t{n}.npy", "captions": [f"motion {sample_id}"],
                        "split": "train", "fps": 20})
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_cli([sys.executable, "shards/make_shards.py", "manifest", "--file", str(folder / "b.jsonl"),
             "--out", str(folder / "b")])
    return folder / "b", test_id


def test_a_planted_duplicate_is_dropped_listed_and_the_report_reused_on_resume(demo_shards, planted, tmp_path):
    shards_b, test_id = planted
    mixture = ["data.shards=null", f"data.sources=[{{shards: {demo_shards}, name: a}}, {{shards: {shards_b}, name: b}}]",
               "data.eval_source=a", "train.val_every=100", "train.save_every=2", f"run.dir={tmp_path / 'run'}"]
    out = train([*mixture, "train.max_steps=2"])
    report = json.loads((tmp_path / "run" / "leaks.json").read_text())
    assert "planted" in report["dropped"]["b"]
    pair = next(p for p in report["pairs"] if (p["train"], p["against"]) == ("b", "a"))
    assert {"id": "planted", "of": f"test/{test_id}", "kind": "copy", "error_m": 0.0} in pair["duplicates"]
    assert pair["count"] == len(pair["duplicates"]) >= 1
    dropped = sum(len(ids) for ids in report["dropped"].values())
    assert f"leaks: {dropped} train samples duplicate a val/test sample, left out of training" in out.stdout
    assert report["inputs"]["action"] == "drop" and set(report["inputs"]["keys"]) == {"a", "b"}

    # resumed: the report is read back, not computed again
    (tmp_path / "run" / "leaks.json").write_text(json.dumps({**report, "seconds": -1.0}))
    out = train([*mixture, "train.max_steps=3", "resume=latest"])
    assert "leaks.json (reused)" in out.stdout
    assert json.loads((tmp_path / "run" / "leaks.json").read_text())["seconds"] == -1.0
    # a resume with other leak settings would train on other samples: refused in one line
    out = train([*mixture, "train.max_steps=4", "resume=latest", "data.leaks=report"], check=False)
    assert_refused(out, "leaks.json", "other leak settings or keys (action)")
