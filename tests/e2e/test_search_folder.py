"""`rehamot-search index RUN --motions DIR`: a folder of .npy motions (no shards, no captions)
as a named index beside the run's own; `query`/`serve --index NAME`; `index --split all`."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

GOOD = 4  # real test motions in the folder


def search(*args: str, check: bool = True):
    return run_cli([sys.executable, "rehamot/search.py", *args], check=check)


@pytest.fixture(scope="module")
def run_dir(indexed_run) -> Path:
    return indexed_run  # its own index, which a named one must leave alone


@pytest.fixture(scope="module")
def motions_dir(demo_shards, tmp_path_factory) -> Path:
    """Four real test motions as a generator writes them (raw features, MOTION_ID.npy), and
    three files that are not motions of this model."""
    from rehamot.data.reading import read_raw_motions

    folder = tmp_path_factory.mktemp("generated") / "my gen"  # a name to sanitise
    folder.mkdir()
    motions = read_raw_motions(str(demo_shards), "test")
    for motion_id in sorted(motions)[:GOOD]:
        np.save(folder / f"{motion_id}.npy", motions[motion_id])
    np.save(folder / "kit.npy", np.zeros((20, 251), np.float32))
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "notes.npy").write_text("not numbers")
    return folder


@pytest.fixture(scope="module")
def folder_index(run_dir, motions_dir) -> dict:
    own = (run_dir / "index" / "index.json").read_text()
    proc = search("index", str(run_dir), "--motions", str(motions_dir))
    assert (run_dir / "index" / "index.json").read_text() == own, "the run's own index was replaced"
    return {"stdout": proc.stdout, "path": run_dir / "search-index-my_gen", "name": "my_gen"}


def test_a_folder_is_indexed_beside_the_runs_own(folder_index, run_dir):
    out = folder_index["stdout"]
    assert f"{GOOD} motions, 0 captions" in out and str(folder_index["path"]) in out
    assert "skipped 3 file(s):" in out
    assert re.search(r"kit\.npy: features of shape \(20, 251\), this model reads \(frames, 263\)", out)
    assert re.search(r"pickled\.npy: not a readable \.npy file \(.*Python objects", out)
    assert "notes.npy: not a .npy file" in out
    from rehamot.retrieval.index import SearchIndex

    named = SearchIndex.load(run_dir, name=folder_index["name"])
    own = SearchIndex.load(run_dir)
    assert named.meta["skipped"] and len(named.motion_ids) == GOOD and not named.caption_ids
    # the files' motions are encoded as the shards' own: normalised with the bundle's Mean/Std
    for motion_id in named.motion_ids:
        np.testing.assert_allclose(named.motion_emb[named.position[motion_id]],
                                   own.motion_emb[own.position[motion_id]], atol=1e-5)


def test_query_a_named_index_by_text(folder_index, run_dir, motions_dir):
    name = folder_index["name"]
    payload = json.loads(search("query", str(run_dir), "a person jumps", "--index", name, "--json").stdout)
    assert all(hit["captions"] == [] for hit in payload["hits"])
    ids = {hit["motion_id"] for hit in payload["hits"]}  # top 5 of 4: all of them, ids = file names
    assert ids == {p.stem for p in motions_dir.glob("0*.npy")} and len(ids) == GOOD
    table = search("query", str(run_dir), "a person jumps", "--index", name, "--top-k", "2").stdout
    assert "no captions" in table
    by_motion = search("query", str(run_dir), "--motion", sorted(ids)[0], "--index", name).stdout
    assert "no captions in this index" in by_motion
    missing = search("query", str(run_dir), "a jump", "--index", "nope", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("search: no search index named 'nope'")


def test_the_page_serves_a_named_index_without_captions(folder_index, run_dir, tmp_path):
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "rehamot/search.py", "serve", str(run_dir), "--port", "0",
                                 "--index", folder_index["name"]], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"serve printed no URL: {line!r}\n{log.read_text()[-3000:]}"
        url = match.group(0)

        def get(path: str):
            with urllib.request.urlopen(url + path, timeout=30) as response:
                return response.read().decode("utf-8")

        info = json.loads(get("/api/info"))
        assert info["num_motions"] == GOOD and info["num_captions"] == 0 and info["name"] == "my_gen"
        hits = json.loads(get("/api/search?q=a%20person%20jumps&k=3"))["hits"]
        assert len(hits) == 3 and all(hit["captions"] == [] for hit in hits)
        motion = json.loads(get(f"/api/motion/{hits[0]['motion_id']}"))
        assert motion["captions"] == [] and len(motion["joints"]) > 0
        assert "no captions" in get("/static/app.js")  # what a card and the detail view show then
    finally:
        proc.kill()
        proc.wait()


def test_split_all_indexes_every_split_and_names_shared_ids(run_dir, demo_shards, tmp_path):
    # the test split listed twice, as "test" and "retest": the same ids in two splits
    shards = tmp_path / "twice"
    shutil.copytree(demo_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["retest"] = manifest["splits"]["test"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = search("index", str(run_dir), "--shards", str(shards), "--split", "all", "--name", "all").stdout
    counts = {split: sum(r["samples"] for r in entry["shards"]) for split, entry in manifest["splits"].items()}
    assert f"{sum(counts.values())} motions" in out and "all split" in out
    from rehamot.retrieval.index import SearchIndex

    index = SearchIndex.load(run_dir, name="all")
    test_ids = SearchIndex.load(run_dir).motion_ids
    assert {f"{i}@test" for i in test_ids} | {f"{i}@retest" for i in test_ids} <= set(index.motion_ids)
    assert not set(test_ids) & set(index.motion_ids)  # a shared id never stands alone
    plain = [i for i in index.motion_ids if "@" not in i]
    assert len(plain) == counts["train"] + counts["val"]
    payload = json.loads(search("query", str(run_dir), "a person jumps", "--index", "all", "--json").stdout)
    assert payload["hits"] and all(hit["captions"] for hit in payload["hits"])
