"""Shards are handed to other people: the converter reads nothing outside the corpus root, and
hostile input (odd ids, absurd frame rates, lying .npy headers) is skipped or reported, never
a crash.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from shard_fixtures import caption_line, clean_corpus, random_motion, read_split, skips

from rehamot.data import schema
from shards.make_shards import main
from shards.plan import is_valid_key

DIM = 8
SECRET = "secret words from outside the corpus"


def build(root, out, *extra: str) -> dict:
    assert main(["humanml3d", "--root", str(root), "--out", str(out), "--feature-dim", str(DIM),
                 *extra]) == 0
    return json.loads((out / schema.MANIFEST_NAME).read_text())


def shard_bytes(out) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))


def all_texts(out, manifest) -> list[str]:
    return [c["text"] for split in manifest["splits"] for s in read_split(out, split)
            for c in s["meta"]["captions"]]


def lying_header(shape: tuple[int, ...], descr: str = "<f4", payload: bytes = b"\0" * 64
                 ) -> bytes:
    """An .npy whose header claims `shape` but which holds only `payload`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


HUGE = (10**12, DIM)  # 32 TB of float32: numpy would try to allocate it before reading


# --- paths: nothing outside the root --------------------------------------------------------

@pytest.fixture
def layout_with_links(tmp_path):
    """Six motions; two of them are symlinks out of the root, two symlinks within it."""
    root = tmp_path / "corpus"
    clean_corpus(root, n=6, dim=DIM, seed=3)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "private.txt").write_text(caption_line(SECRET) + "\n")
    np.save(outside / "private.npy", random_motion(np.random.default_rng(9), 50, DIM))
    # 000000's captions and 000001's motion are links to files outside the root
    (root / "texts" / "000000.txt").unlink()
    (root / "texts" / "000000.txt").symlink_to(outside / "private.txt")
    (root / "new_joint_vecs" / "000001.npy").unlink()
    (root / "new_joint_vecs" / "000001.npy").symlink_to(outside / "private.npy")
    # 000002's captions and 000003's motion are links that stay inside the root
    (root / "store").mkdir()
    os.replace(root / "texts" / "000002.txt", root / "store" / "captions.txt")
    (root / "texts" / "000002.txt").symlink_to(root / "store" / "captions.txt")
    os.replace(root / "new_joint_vecs" / "000003.npy", root / "store" / "motion.npy")
    (root / "new_joint_vecs" / "000003.npy").symlink_to("../store/motion.npy")
    return root


def test_layout_symlinks_out_of_the_root_are_skipped_as_outside_root(layout_with_links,
                                                                     tmp_path):
    out = tmp_path / "out"
    manifest = build(layout_with_links, out)
    found = skips(manifest)
    assert found[("000000", "motion")] == "outside_root"
    assert found[("000001", "motion")] == "outside_root"
    assert manifest["accounting"]["motions"]["skipped"] == 2
    written = {s["key"] for split in manifest["splits"] for s in read_split(out, split)}
    assert {"000002", "000003"} <= written and not {"000000", "000001"} & written
    assert SECRET not in " ".join(all_texts(out, manifest))
    assert SECRET.encode() not in shard_bytes(out)
    # the manifest does not name where the links point
    assert "elsewhere" not in (out / schema.MANIFEST_NAME).read_text()
    assert main(["verify", str(out)]) == 0


def test_layout_root_given_through_a_symlink_is_still_its_own_inside(layout_with_links,
                                                                     tmp_path):
    link = tmp_path / "link-to-corpus"
    link.symlink_to(layout_with_links)
    manifest = build(link, tmp_path / "out")
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"000000": "outside_root", "000001": "outside_root"}


def test_split_file_and_mean_std_outside_the_root_are_not_read(tmp_path):
    root = tmp_path / "corpus"
    info = clean_corpus(root, n=6, dim=DIM, seed=4)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "test.txt").write_text("".join(f"{i}\n" for i in info["ids"]))
    np.save(outside / "Mean.npy", np.full(DIM, 123.0, dtype=np.float32))
    np.save(root / "Std.npy", np.ones(DIM, dtype=np.float32))
    (root / "test.txt").unlink()
    (root / "test.txt").symlink_to(outside / "test.txt")
    (root / "Mean.npy").symlink_to(outside / "Mean.npy")
    manifest = build(root, tmp_path / "out")
    found = skips(manifest)
    assert found[("test.txt", "file")] == "outside_root"
    assert found[("Mean.npy", "file")] == "outside_root"
    assert "test" not in manifest["splits"]
    assert manifest["mean_std_source"].startswith("computed")
    assert 123.0 not in manifest["mean"]


def write_jsonl(folder, records: list) -> str:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path = folder / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def record(motion_id, motion, split="train", fps=20, captions=("a person walks",)):
    return {"id": motion_id, "motion": motion, "captions": list(captions), "split": split,
            "fps": fps}


def save(path, seed: int = 0, frames: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, random_motion(np.random.default_rng(seed), frames, DIM))


def jsonl_build(path, out, *extra: str) -> dict:
    assert main(["manifest", "--file", path, "--out", str(out), *extra]) == 0
    return json.loads((out / schema.MANIFEST_NAME).read_text())


def test_jsonl_motion_paths_out_of_the_file_folder_are_skipped(tmp_path):
    corpus, outside = tmp_path / "corpus", tmp_path / "elsewhere"
    save(corpus / "motions" / "ok.npy", 1)
    save(outside / "private.npy", 2)
    (corpus / "motions" / "in_link.npy").symlink_to("ok.npy")
    (corpus / "motions" / "out_link.npy").symlink_to(outside / "private.npy")
    records = [record("ok", "motions/ok.npy"),
               record("in_link", "motions/in_link.npy"),
               record("absolute", str(outside / "private.npy")),
               record("dotdot", "../elsewhere/private.npy"),
               record("out_link", "motions/out_link.npy")]
    manifest = jsonl_build(write_jsonl(corpus, records), tmp_path / "out")
    assert {k[0]: v for k, v in skips(manifest).items()} == {
        "absolute": "outside_root", "dotdot": "outside_root", "out_link": "outside_root"}
    assert [s["key"] for s in read_split(tmp_path / "out", "train")] == ["in_link", "ok"]


def test_jsonl_root_option_sets_the_boundary(tmp_path):
    corpus = tmp_path / "corpus"
    save(corpus / "motions" / "a.npy", 1)
    save(corpus / "meta" / "c.npy", 3)
    save(tmp_path / "elsewhere" / "b.npy", 2)
    path = write_jsonl(corpus / "meta", [record("a", "../motions/a.npy"),
                                         record("b", "../../elsewhere/b.npy"),
                                         record("c", "c.npy")])
    manifest = jsonl_build(path, tmp_path / "o1")  # the root is the file's folder
    assert {k[0]: v for k, v in skips(manifest).items()} == {"a": "outside_root",
                                                             "b": "outside_root"}
    manifest = jsonl_build(path, tmp_path / "o2", "--root", str(corpus))
    assert {k[0]: v for k, v in skips(manifest).items()} == {"b": "outside_root"}
    assert [s["key"] for s in read_split(tmp_path / "o2", "train")] == ["a", "c"]


def test_jsonl_root_must_be_a_folder(tmp_path, capsys):
    save(tmp_path / "m.npy")
    path = write_jsonl(tmp_path, [record("a", "m.npy")])
    assert main(["manifest", "--file", path, "--root", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")]) == 1
    assert "--root" in capsys.readouterr().err


# --- ids: matched exactly -------------------------------------------------------------------

@pytest.mark.parametrize("text", ["nl_id\n", "id\r", "", "a.b", "../x", "é", "x" * 81])
def test_keys_are_matched_exactly(text):
    assert not is_valid_key(text)


def test_jsonl_id_or_split_with_a_trailing_newline_is_refused(tmp_path):
    save(tmp_path / "m.npy")
    records = [record("good", "m.npy"), record("nl_id\n", "m.npy"),
               record("other", "m.npy", split="train\n")]
    manifest = jsonl_build(write_jsonl(tmp_path, records), tmp_path / "out")
    found = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert found == {"nl_id\n": "bad_id", "other": "bad_record"}
    assert [s["key"] for s in read_split(tmp_path / "out", "train")] == ["good"]
    assert list(manifest["splits"]) == ["train"]


def test_caption_index_with_a_non_ascii_digit_is_a_skip(tmp_path):
    root = tmp_path / "corpus"
    clean_corpus(root, n=6, dim=DIM, seed=5)
    (root / "train.txt").write_text("000000:0,\u00b2\n000001\n000002\n000003\n")
    manifest = build(root, tmp_path / "out")
    assert skips(manifest)[("000000:\u00b2", "caption")] == "bad_caption_index"


# --- frame rates: a skip, not a traceback ---------------------------------------------------

def test_absurd_fps_in_a_record_is_a_bad_fps_skip(tmp_path):
    save(tmp_path / "m.npy")
    good = json.dumps(record("good", "m.npy")).encode()
    raw = {"inf": b"Infinity", "ninf": b"-Infinity", "nan": b"NaN", "tiny": b"1e-300",
           "neg": b"-20", "zero": b"0", "huge": b"1e300", "bigint": b"1" + b"0" * 400,
           "bool": b"true", "text": b'"20"'}
    records = [good] + [good.replace(b'"good"', f'"{k}"'.encode()).replace(b'"fps": 20',
                                                                           b'"fps": ' + v)
                        for k, v in raw.items()]
    manifest = jsonl_build(write_jsonl(tmp_path, records), tmp_path / "out")
    assert {s["id"]: s["reason"] for s in manifest["skipped"]} == {k: "bad_fps" for k in raw}
    assert manifest["fps"] == 20.0
    assert [s["key"] for s in read_split(tmp_path / "out", "train")] == ["good"]


def test_json_the_parser_cannot_hold_is_a_bad_record(tmp_path):
    save(tmp_path / "m.npy")
    good = json.dumps(record("good", "m.npy")).encode()
    records = [good, b'{"id": "x", "n": ' + b"9" * 5000 + b"}", b"[" * 100_000,
               good.replace(b'"good"', b'"span"').replace(
                   b'"a person walks"', b'{"text": "t", "start": 1' + b"0" * 400 + b', "end": 2}')]
    manifest = jsonl_build(write_jsonl(tmp_path, records), tmp_path / "out")
    found = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert found == {"line:2": "bad_record", "line:3": "bad_record",
                     "span:0": "bad_caption_span", "span": "no_captions"}


@pytest.mark.parametrize("fps", ["inf", "nan", "0", "1e-300", "-5", "1e300"])
def test_absurd_fps_option_is_an_error(tmp_path, capsys, fps):
    root = tmp_path / "corpus"
    clean_corpus(root, n=6, dim=DIM)
    assert main(["humanml3d", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--feature-dim", str(DIM), "--fps", fps]) == 1
    assert "--fps" in capsys.readouterr().err


# --- .npy headers checked before anything is allocated --------------------------------------

def test_source_motion_with_a_lying_header_is_skipped(tmp_path):
    root = tmp_path / "corpus"
    clean_corpus(root, n=6, dim=DIM, seed=6)
    (root / "new_joint_vecs" / "000000.npy").write_bytes(lying_header(HUGE))
    (root / "new_joint_vecs" / "000001.npy").write_bytes(lying_header((50, DIM), "|O"))
    manifest = build(root, tmp_path / "out")
    assert skips(manifest)[("000000", "motion")] == "unreadable_motion"
    assert skips(manifest)[("000001", "motion")] == "pickled_motion"
    detail = {s["id"]: s["detail"] for s in manifest["skipped"]}["000000"]
    assert "header" in detail


def test_jsonl_feature_dim_inference_ignores_lying_headers(tmp_path):
    save(tmp_path / "a.npy", 1)
    (tmp_path / "b.npy").write_bytes(lying_header((10**12, 3)))
    (tmp_path / "c.npy").write_bytes(lying_header((10**12, 3)))
    records = [record("a", "a.npy"), record("b", "b.npy"), record("c", "c.npy")]
    manifest = jsonl_build(write_jsonl(tmp_path, records), tmp_path / "out")
    assert manifest["feature_dim"] == DIM


def test_mean_std_with_a_lying_header_is_an_error(tmp_path, capsys):
    root = tmp_path / "corpus"
    clean_corpus(root, n=6, dim=DIM)
    (root / "Mean.npy").write_bytes(lying_header((10**12,)))
    np.save(root / "Std.npy", np.ones(DIM, dtype=np.float32))
    assert main(["humanml3d", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--feature-dim", str(DIM)]) == 1
    assert "Mean.npy" in capsys.readouterr().err


def replace_members(shard, replacements: dict[str, bytes]) -> None:
    """Rewrite a shard with some members' bytes replaced (tar names -> bytes)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = replacements.get(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_verify_reports_malformed_samples_by_name(tmp_path, capsys):
    root = tmp_path / "corpus"
    clean_corpus(root, n=12, dim=DIM, seed=8)
    out = tmp_path / "out"
    build(root, out)
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    shard = out / "train-000000.tar"
    replace_members(shard, {
        "000000.motion.npy": lying_header(HUGE),
        "000001.motion.npy": lying_header((50, DIM), "|O"),
        "000002.json": b"not json",
        "000003.json": b"[1, 2]",
    })
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    # verify reads through the index: each sample read where it was sharded is a digest
    # mismatch (members of other sizes move the later ones), then its bytes are judged, the
    # lying header first checked against the bytes there (nothing allocated)
    for key in ("000000", "000001", "000002", "000003"):
        lines = err.split(f"train-000000.tar/{key}:")[1:]
        assert lines and "digest_mismatch" in lines[0][:200], (key, lines)
    assert "train-000000.tar/000000: cannot decode motion.npy (NpyHeaderError: header claims shape " \
           "(1000000000000, 8)" in err


def test_verify_reads_no_shard_outside_its_folder(tmp_path, capsys):
    root = tmp_path / "corpus"
    clean_corpus(root, n=6, dim=DIM, seed=2)
    out = tmp_path / "out"
    manifest = build(root, out)
    (tmp_path / "outside.tar").write_bytes((out / "val-000000.tar").read_bytes())
    (out / "test-000000.tar").unlink()
    (out / "test-000000.tar").symlink_to(tmp_path / "outside.tar")
    manifest["splits"]["val"]["shards"][0]["path"] = "../outside.tar"
    (out / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "'../outside.tar': not a file inside the shard folder" in err
    assert "'test-000000.tar': not a file inside the shard folder" in err
    assert "sha256" not in err  # neither file was read
    assert "test-000000.tar: a tar the manifest does not list" not in err
