"""The shard index is the map: it records where each member's bytes lie (what the standard
library's tar reader finds), readers follow it on a file, a file:// URL and a `pipe:` stream
alike and get what webdataset gets, a stock WebDataset pipeline still reads our shards, and
`make_shards.py index` maps WebDataset shards made elsewhere or upgrades an older set in place."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import truncate_inside_sample, write_shard_set

from rehamot.data import leaks, schema
from rehamot.data.eval_set import EvalSet
from rehamot.data.pipeline import DataConfig, TrainStream
from rehamot.data.reading import ShardReadError, load_index, read_manifest, read_segment
from shards.make_shards import main
from shards.verify import verify_shards


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("tars"), {"train": [13, 7], "test": [4]}, feature_dim=5)


def index_of(shard_set, number: int = 0, split: str = "train") -> schema.ShardIndex:
    return load_index(str(shard_set.root), shard_set.manifest["splits"][split]["shards"][number])


def members(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if not k.startswith("__")}


def test_the_index_maps_what_tarfile_finds(shard_set):
    path, index = shard_set.shard_paths("train")[0], index_of(shard_set)
    with tarfile.open(path) as tar:
        found = {m.name: (m.offset_data, m.size) for m in tar}
    assert index.bytes == path.stat().st_size and index.keys == shard_set.ids["train"][:13]
    assert index.members == (schema.MOTION_MEMBER, schema.META_MEMBER) and index.problem is None
    for position, key in enumerate(index.keys):
        for slot, member in enumerate(index.members):
            assert found[f"{key}.{member}"] == (index.offsets[position, slot], index.sizes[position, slot])
        assert index.captions[position] == [list(c) for c in shard_set.captions[key]]


@pytest.mark.parametrize("first", [0, 4])
def test_reads_through_the_index_are_webdataset_s_samples(shard_set, first):
    path, index = shard_set.shard_paths("train")[0], index_of(shard_set)
    theirs = [members(s) for s in wds.tarfile_samples(iter([{"url": str(path)}]))][first:]
    for url in (str(path), f"file://{path}", f"pipe:cat {path}"):
        ours = list(read_segment(url, index, first))
        assert [members(r) for r in ours] == theirs
        assert [r["__position__"] for r in ours] == list(range(first, len(index)))


def test_a_stock_webdataset_pipeline_reads_our_shards(shard_set):
    urls = [str(p) for p in shard_set.shard_paths("train")]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("__key__", "motion.npy", "json")
    seen = []
    for key, motion, meta in dataset:
        assert np.array_equal(motion, shard_set.motions[key]) and meta["id"] == key
        assert [(c["caption_id"], c["text"]) for c in meta["captions"]] == shard_set.captions[key]
        seen.append(key)
    assert seen == shard_set.ids["train"]


def test_a_cut_shard_gives_its_samples_before_the_cut_then_one_error(shard_set, tmp_path):
    path, index = tmp_path / "train-000000.tar", index_of(shard_set)
    shutil.copy(shard_set.shard_paths("train")[0], path)
    truncate_inside_sample(path, 5)
    for url in (str(path), f"pipe:cat {path}"):
        samples = read_segment(url, index)
        assert [next(samples)["__key__"] for _ in range(5)] == index.keys[:5]
        with pytest.raises(ShardReadError, match="cut short"):
            next(samples)


def test_stopping_early_on_a_pipe_is_not_an_error(tmp_path, recwarn):
    """A slot reads part of a shard: closing a `pipe:` URL's command early (curl then exits
    23, a write error) must end the segment quietly, not as an error of the shard."""
    big = write_shard_set(tmp_path, {"train": [12]}, feature_dim=263, frames=(150, 200))
    path, index = big.shard_paths("train")[0], index_of(big)  # ~2 MB: more than a pipe buffers
    url = f"pipe:cat {path} || exit 23"
    assert [s["__key__"] for s in read_segment(url, index, 2, 5)] == ["000002", "000003", "000004"]
    samples = read_segment(url, index)
    next(samples)
    samples.close()  # the consumer stops after one sample
    assert not [w for w in recwarn if "unraisable" in str(w.category).lower()]


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((2, 5), dtype=">f8"),
    np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)), np.zeros((0, 263), np.float32),
    np.float32(2.5), np.arange(4, dtype=np.int64)])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_the_fast_npy_path_decodes_what_np_load_decodes(array, version):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    data = buffer.getvalue()
    assert schema._NPY_SAVED_HEADER.match(data)  # the fast path is taken
    decoded = schema.decode_motion(data)
    expected = np.load(io.BytesIO(data))
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)
    with pytest.raises(schema.NpyHeaderError, match="bytes"):
        schema.decode_motion(data[:-1] if array.size else data + b"\0")


# -- make_shards.py index --------------------------------------------------------------------------
def write_plain_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A WebDataset shard as others write it (webdataset's TarWriter, its own member order)."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, data in samples:
            sink.write({"__key__": key, **data})


def npy(motion: np.ndarray) -> bytes:
    return schema.encode_motion(motion)


def plain_set(root: Path, dim: int = 6) -> dict[str, np.ndarray]:
    """train-0.tar and train-1.tar (json list, json object, txt captions; two bad samples) and
    val-0.tar, test-0.tar; returns the motions of the usable train samples."""
    rng = np.random.default_rng(0)
    root.mkdir()
    usable: dict[str, np.ndarray] = {}

    def sample(key: str, split: str, i: int) -> tuple[str, dict[str, bytes]]:
        motion = rng.standard_normal((20 + i, dim)).astype(np.float32)
        if split == "train":
            usable[key] = motion
        captions = [f"{split} motion {i} caption {k}" for k in range(1 + i % 3)]
        caption = {0: ("json", json.dumps(captions)), 1: ("json", json.dumps({"captions": captions})),
                   2: ("txt", "\n".join(captions) + "\n")}[i % 3]
        return key, {"npy": npy(motion), caption[0]: caption[1].encode()}

    for split, shards in (("train", 2), ("val", 1), ("test", 1)):
        for number in range(shards):
            samples = [sample(f"{split}{number}_{i:03d}", split, i) for i in range(8)]
            if split == "train" and number == 1:
                samples.append(("bad_nan", {"npy": npy(np.full((20, dim), np.nan, np.float32)), "txt": b"x"}))
                samples.append(("bad_nocap", {"npy": npy(np.zeros((20, dim), np.float32))}))
            write_plain_shard(root / f"{split}-{number}.tar", samples)
    return usable


def test_index_maps_webdataset_shards_made_elsewhere(tmp_path):
    usable = plain_set(tmp_path / "plain")
    out = tmp_path / "for-the-bucket"
    assert main(["index", str(tmp_path / "plain"), "--out", str(out), "--fps", "20", "--feature-dim", "6"]) == 0
    assert not list((tmp_path / "plain").glob("*.json")) + list((tmp_path / "plain").glob("*.npz"))  # to --out only
    for path in (tmp_path / "plain").iterdir():
        shutil.copy(path, out / path.name)  # the upload beside the shards
    manifest = read_manifest(str(out))
    assert manifest["format_version"] == schema.FORMAT_VERSION and manifest["feature_dim"] == 6
    assert {s: e["motions"] for s, e in manifest["splits"].items()} == {"train": 16, "val": 8, "test": 8}
    assert sorted((s["id"], s["reason"]) for s in manifest["skipped"]) == [
        ("bad_nan", "non_finite"), ("bad_nocap", "missing_caption_file")]
    frames = np.concatenate(list(usable.values())).astype(np.float64)
    assert np.allclose(manifest["mean"], frames.mean(0), atol=1e-5)  # Mean/Std of the train split
    assert np.allclose(manifest["std"], frames.std(0), atol=1e-5)
    stream = TrainStream(DataConfig(str(out), batch_size=4, num_workers=0, seed=1, shuffle_buffer=0), None)
    batches = list(stream.loader(0))
    assert sum(b["bad_samples"] for b in batches) == 0 and len(batches) == 4
    assert {i for b in batches for i in b["ids"]} == set(usable)
    assert all(t.startswith("train motion") for b in batches for t in b["texts"])
    eval_set = EvalSet(DataConfig(str(out), split="test", batch_size=4))
    assert eval_set.num_motions == 8 and eval_set.captions[0].text == "test motion 0 caption 0"
    assert sum(len(b["ids"]) for b in eval_set.motion_batches(3)) == 8
    assert verify_shards(out) == []
    keys = leaks.load_keys(str(out), manifest, "plain")  # 6 features give no joints: ids, splits, parents
    assert manifest["leak_keys"]["content"] is False and keys.splits.count("train") == 16 and len(keys) == 32
    assert keys.parents == keys.ids and "bad_nan" not in keys.ids


def test_a_set_made_elsewhere_may_keep_its_keys_in_any_order_but_not_twice(tmp_path, capsys):
    rng = np.random.default_rng(4)
    root = tmp_path / "unsorted"
    root.mkdir()
    for split in ("train", "val", "test"):
        keys = [f"{split}_{i}" for i in (3, 1, 2, 0)]  # not sorted
        write_plain_shard(root / f"{split}-0.tar", [
            (key, {"npy": npy(rng.standard_normal((20, 6)).astype(np.float32)), "txt": key.encode()}) for key in keys])
    assert main(["index", str(root), "--fps", "20", "--feature-dim", "6"]) == 0
    assert verify_shards(root) == []
    (root / schema.MANIFEST_NAME).unlink()
    sample = ("test_1", {"npy": npy(np.zeros((20, 6), np.float32)), "txt": b"again"})
    write_plain_shard(root / "test-0.tar", [sample, ("test_0", sample[1]), sample])
    capsys.readouterr()
    assert main(["index", str(root), "--fps", "20", "--feature-dim", "6"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: test-0.tar: a key appears in two places of the tar"]


def test_index_refuses_a_hostile_or_compressed_shard_in_one_line(tmp_path, capsys):
    from test_hostile_shards import gzip_bomb, negative_directory

    plain_set(tmp_path / "plain")
    negative_directory(tmp_path / "plain" / "train-0.tar")
    assert main(["index", str(tmp_path / "plain"), "--fps", "20", "--layout", "humanml3d"]) == 1
    assert "train-0.tar: member 'adir' claims -512 bytes" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "plain")
    plain_set(tmp_path / "plain")
    gzip_bomb(tmp_path / "plain" / "val-0.tar", 1 << 24)
    assert main(["index", str(tmp_path / "plain"), "--fps", "20", "--feature-dim", "6"]) == 1
    assert "val-0.tar: a compressed tar" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "plain"), "--feature-dim", "6"]) == 1
    assert "--fps" in capsys.readouterr().err


def as_format_2(root: Path) -> None:
    """Rewrite a shard set's indexes and manifest as format 2 wrote them (digests only)."""
    manifest = json.loads((root / schema.MANIFEST_NAME).read_text())
    for entry in manifest["splits"].values():
        for record in entry["shards"]:
            index = load_index(str(root), record)
            body = {"format": schema.INDEX_FORMAT, "version": 1, "shard": record["path"], "digest": schema.DIGEST,
                    "members": list(index.members),
                    "samples": [[key, *(index.digest(p, s).hex() for s in range(2))]
                                for p, key in enumerate(index.keys)]}
            path = root / record["index"]
            path.write_text(json.dumps(body, separators=(",", ":")) + "\n")
            record["index_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["format_version"] = 2
    (root / schema.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_index_upgrades_an_older_set_in_place(shard_set, tmp_path, capsys):
    old = Path(shutil.copytree(shard_set.root, tmp_path / "old"))
    as_format_2(old)
    with pytest.raises(schema.ShardSetError, match="make_shards.py index DIR"):
        read_manifest(str(old))
    assert main(["index", str(old)]) == 0
    for name in ("train-000000.index.json", "test-000000.index.json"):
        assert (old / name).read_bytes() == (shard_set.root / name).read_bytes()  # as if sharded now
    upgraded = json.loads((old / "manifest.json").read_text())  # the fixture writes no leak keys
    assert upgraded == {**shard_set.manifest, "leak_keys": upgraded["leak_keys"]}
    keys = leaks.load_keys(str(old), upgraded, "old")
    assert keys.ids == [i for split in ("train", "test") for i in shard_set.ids[split]] == keys.parents
    assert upgraded["leak_keys"]["content"] is False  # 5 features give no joints: ids and splits only
    shard = old / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[int(index_of(shard_set, 1).offsets[-1, 0]) + 200] ^= 1  # inside the last sample's motion
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    as_format_2(old)
    assert main(["index", str(old)]) == 1
    assert "train-000001.tar/000019: differs from its format-2 index" in capsys.readouterr().err


def test_an_upgraded_set_has_the_leak_keys_of_a_fresh_sharding(demo_shards, tmp_path):
    """A format-2 set sharded before the keys existed: the upgrade writes the keys file and the
    manifest a fresh sharding of the corpus writes, byte for byte (sub-clips keep their parent)."""
    old = Path(shutil.copytree(demo_shards, tmp_path / "old"))
    as_format_2(old)
    manifest = json.loads((old / schema.MANIFEST_NAME).read_text())
    manifest.pop("leak_keys")
    (old / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    (old / leaks.KEYS_NAME).unlink()
    assert main(["index", str(old)]) == 0
    for path in sorted(demo_shards.iterdir()):
        if path.is_file():
            assert (old / path.name).read_bytes() == path.read_bytes(), path.name
    fresh = leaks.load_keys(str(demo_shards), schema.load_manifest(str(demo_shards)), "demo")
    assert any(parent != sample for sample, parent in zip(fresh.ids, fresh.parents))  # sub-clips were seen


def test_a_set_indexed_here_gets_leak_keys_and_hygiene_finds_a_planted_copy(tmp_path):
    """WebDataset shards made elsewhere (HumanML3D's 263 features), once as they are and once
    with a copy of a test motion planted in train: both indexed with their keys, `hygiene`
    finds the copy and nothing else."""
    rng = np.random.default_rng(3)
    motions = {split: {f"{split}_{i:02d}": (0.2 * rng.standard_normal((40 + 7 * i, 263))).astype(np.float32)
                       for i in range(count)} for split, count in (("train", 10), ("val", 3), ("test", 4))}
    for name, planted in (("clean", {}), ("planted", {"planted_copy": motions["test"]["test_02"]})):
        (tmp_path / name).mkdir()
        for split, samples in motions.items():
            samples = {**samples, **(planted if split == "train" else {})}
            write_plain_shard(tmp_path / name / f"{split}-0.tar", [
                (key, {"npy": npy(samples[key]), "txt": f"{split} {key}".encode()}) for key in sorted(samples)])
        assert main(["index", str(tmp_path / name), "--fps", "20", "--layout", "humanml3d"]) == 0
        manifest = read_manifest(str(tmp_path / name))
        assert manifest["leak_keys"]["layout"] == "humanml3d" and manifest["leak_keys"]["content"] is True
        keys = leaks.load_keys(str(tmp_path / name), manifest, name)
        assert keys.ids == keys.parents == [*planted, *motions["train"], *motions["val"], *motions["test"]]
        assert keys.splits == ["train"] * (10 + len(planted)) + ["val"] * 3 + ["test"] * 4
        assert verify_shards(tmp_path / name) == []
    report = tmp_path / "report.json"
    assert main(["hygiene", str(tmp_path / "clean"), str(tmp_path / "planted"), "--json", str(report)]) == 0
    found = json.loads(report.read_text())
    assert found["dropped"] == {"clean": [], "planted": ["planted_copy"]}
    pairs = {(p["train"], p["against"]): p["duplicates"] for p in found["pairs"]}
    for against in ("clean", "planted"):  # its own test split, and the clean set's
        (copy,) = pairs["planted", against]
        assert copy["id"] == "planted_copy" and copy["of"] == "test/test_02" and copy["error_m"] < 0.001


def test_a_set_mapped_without_keys_is_told_how_to_get_them(tmp_path, capsys):
    plain_set(tmp_path / "plain")
    args = ["index", str(tmp_path / "plain"), "--fps", "20", "--feature-dim", "6"]
    assert main(args) == 0 and main(args) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert said.endswith("already of format 3; nothing to do")
    manifest_path = tmp_path / "plain" / schema.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("leak_keys")  # as mapped before `index` wrote keys
    manifest_path.write_text(json.dumps(manifest))
    assert main(args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert said.endswith("nothing to do (it lists no leak keys: remove its manifest.json and index the shards again)")
    manifest_path.unlink()
    assert main(args) == 0 and leaks.has_keys(read_manifest(str(tmp_path / "plain")))
