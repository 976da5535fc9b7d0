"""Shards, bundles and generated files handed over by someone else, through the commands a user
runs: nothing hangs, runs a command or inflates a bomb; each ends in one line naming the file.

The shard attacks alter only the tar (its index and the manifest stay valid, as training never
checks a whole shard's sha256); the bundle attack rewrites a bundle's config and its checksums,
as an exporter would.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RUN, run_cli
from unit.test_hostile_shards import gzip_bomb, huge_member, negative_directory

pytestmark = pytest.mark.slow

TIMEOUT = 240  # a reader that loops would hang here: the test then fails on the timeout


def py(*args: str, cwd: Path = REPO, timeout: float = TIMEOUT):
    return run_cli([sys.executable, *args], check=False, cwd=cwd, timeout=timeout)


def one_line(out, prefix: str, *fragments: str, code: int = 2) -> str:
    """The refusal: exit `code`, no traceback, one line on stderr starting with `prefix`."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(prefix), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def copy_shards(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def run_dir(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={demo_shards}",
             f"run.dir={out}", "train.max_steps=2", "train.val_every=2", "train.save_every=100"])
    return out


# -- a shard that hung every reader --------------------------------------------------------------
def test_training_counts_a_looping_shard_as_bad_and_goes_on(demo_shards, tmp_path):
    from rehamot.config import load_config
    from rehamot.data import TrainStream, data_config

    shards = copy_shards(demo_shards, tmp_path / "shards")
    overrides = [*TINY_RUN, f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "data.strict=false",
                 "train.max_steps=2", "train.val_every=100", f"model.text_cache_dir={tmp_path / 'cache'}"]
    stream = TrainStream(data_config(load_config(REPO / "configs" / "demo.yaml", overrides), "train"), None)
    shard = Path(stream.shard_urls[stream.plan(0)[0].segments[0].shard])  # what the first batch reads
    negative_directory(shard)
    out = py("rehamot/train.py", "configs/demo.yaml", *overrides)  # hung here, with no output
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # read through its index, no header parsed: the samples after the inserted entry moved
    assert shard.name in out.stderr and "digest_mismatch" in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("attack", [negative_directory, huge_member])
def test_evaluation_refuses_the_bad_test_shard_in_one_line(run_dir, demo_shards, tmp_path, attack):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    attack(shards / "test-000000.tar")
    out = py("rehamot/evaluate.py", str(run_dir), "--shards", str(shards))
    # the evaluation set is built from the indexes; the altered samples are met while motions
    # are encoded, after the progress line: the refusal is the one line after it
    progress = [line for line in out.stderr.splitlines() if "encoding" in line]
    out.stderr = "\n".join(line for line in out.stderr.splitlines() if line not in progress)
    one_line(out, "evaluate: ", "test-000000.tar", "digest_mismatch")


def test_verify_names_a_shard_holding_a_member_of_impossible_size(demo_shards, tmp_path):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    huge_member(shards / "val-000000.tar")
    out = py("shards/make_shards.py", "verify", str(shards))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "val-000000.tar: sha256" in out.stderr and "digest_mismatch" in out.stderr, out.stderr[-3000:]


# -- commands run from shared files ---------------------------------------------------------------
def test_a_bundle_whose_config_names_a_pipe_runs_nothing(run_dir, demo_shards, tmp_path):
    from rehamot.checksums import write_checksums

    bundle = Path(shutil.copytree(run_dir / "best", tmp_path / "bundle"))
    marker = tmp_path / "ran"
    config = bundle / "config.yaml"
    shards = f"pipe:touch {marker}; cat {demo_shards}/manifest.json #://x"
    config.write_text(re.sub(r"(?m)^(\s+shards:).*$", lambda m: f"{m[1]} '{shards}'", config.read_text()))
    assert shards in config.read_text()
    write_checksums(bundle)  # an exporter's checksums prove nothing about intent
    generated = tmp_path / "generated"
    generated.mkdir()
    np.save(generated / "x.npy", np.zeros((40, 263), dtype=np.float32))
    for args, prefix in ((["rehamot/evaluate_generation.py", str(bundle), "--generated", str(generated)],
                          "evaluate_generation: "),  # ran `touch` here, then scored
                         (["rehamot/search.py", "index", str(bundle)], "search: "),  # and here
                         (["rehamot/evaluate.py", str(bundle)], "evaluate: ")):
        one_line(py(*args), prefix, f"{config}: data.shards", "pipe:")
        assert not marker.exists(), args


def test_a_manifest_naming_a_pipe_is_refused_at_training_start(demo_shards, tmp_path):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    name = "pipe:touch ran;cat train-000000.tar"  # with its index beside it: every check passes
    shutil.copy(shards / "train-000000.tar", shards / name)
    shutil.copy(shards / "train-000000.index.json", shards / "pipe:touch ran;cat train-000000.index.json")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = name
    manifest["splits"]["train"]["shards"][0]["index"] = name.removesuffix(".tar") + ".index.json"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = py(str(REPO / "rehamot" / "train.py"), str(REPO / "configs" / "demo.yaml"), *TINY_RUN, "data.shards=.",
             f"run.dir={tmp_path / 'run'}", cwd=shards)
    one_line(out, "rehamot: ", "manifest.json: names a shard file 'pipe:touch ran;cat train-000000.tar'")
    assert not (shards / "ran").exists()


# -- a compression bomb ---------------------------------------------------------------------------
PEAK_RSS = """import resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(out.stderr)
print(out.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def test_a_gzip_bomb_shard_is_refused_never_inflated(run_dir, demo_shards, tmp_path):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    bomb = 3 << 29  # 1.5 GiB of zeros
    assert gzip_bomb(shards / "test-000000.tar", bomb) < 2 << 20
    out = py("-c", PEAK_RSS, sys.executable, "rehamot/evaluate.py", str(run_dir), "--shards", str(shards))
    code, peak = map(int, out.stdout.split())
    assert code == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # read through its index: the mapped bytes of a 2 MB file, never inflated
    assert "test-000000.tar" in out.stderr and "digest_mismatch" in out.stderr, out.stderr
    assert peak < bomb // 2, peak  # webdataset held the whole member, and more: 3.5 GB for 1.5


# -- generated files ------------------------------------------------------------------------------
def test_a_generated_file_claiming_terabytes_is_skipped_and_listed(run_dir, demo_shards, tmp_path):
    from rehamot.evaluation.generation_eval import read_split

    ids, _, motions = read_split(str(demo_shards), "test")
    generated = tmp_path / "generated"
    generated.mkdir()
    for motion_id in ids[1:]:
        np.save(generated / f"{motion_id}.npy", motions[motion_id], allow_pickle=False)
    with open(generated / f"{ids[0]}.npy", "wb") as lying:  # np.load would allocate ~1 PB
        np.lib.format.write_array_header_1_0(lying, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (10 ** 12, 263)})
        lying.write(motions[ids[0]].astype("<f4").tobytes())
    out = py("rehamot/evaluate_generation.py", str(run_dir), "--generated", str(generated), "--batch-size", "8",
             "--repeats", "1", "--json", str(tmp_path / "scores.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [item["file"] for item in scores["unreadable"]] == [f"{ids[0]}.npy"]
    assert "header claims shape (1000000000000, 263)" in scores["unreadable"][0]["reason"]
    assert scores["counts"]["motions"] == len(ids) - 1
