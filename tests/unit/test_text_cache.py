"""The frozen-LM text-feature cache on real shards and the real packaged MiniLM (1 layer).

Run as a script under torchrun, this file is also the worker of the 2-rank build test.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rehamot.data import tokenize
from rehamot.data.reading import BadSampleError
from rehamot.models import TextEncoder, TextEncoderConfig, embedded_model_dir, load_tokenizer
from rehamot.training import text_cache as tc

REPO = Path(__file__).resolve().parents[2]
SPLIT = {"train": [5, 4, 3]}  # uneven shards; 12 samples, 30 distinct captions
MAX_LEN = 64


def minilm(**overrides) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(**{"num_layers": 1, **overrides}))


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return minilm()


@pytest.fixture(scope="module")
def tokenizer(encoder: TextEncoder):
    return load_tokenizer(encoder.cfg)


def shard_set(root: Path, *, sha256: bool = False, bad: dict[int, str] | None = None):
    from data_fixtures import write_shard_set

    shards = write_shard_set(root, SPLIT, feature_dim=4, frames=(5, 8), bad=bad)
    if sha256:  # what make_shards writes: then the manifest alone identifies the captions
        for record in shards.manifest["splits"]["train"]["shards"]:
            record["sha256"] = hashlib.sha256((root / record["path"]).read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(shards.manifest))
    return shards


def all_texts(shards) -> set[str]:
    return {text for sample in shards.ids["train"] for _, text in shards.captions[sample]}


def build(encoder, tokenizer, shards_dir: Path, cache_dir: Path, **kwargs) -> tc.CacheResult:
    kwargs.setdefault("max_text_len", MAX_LEN)
    return tc.load_or_build(encoder, tokenizer, shards=str(shards_dir), split="train", cache_dir=cache_dir,
                            **kwargs)


class ForwardCounter:
    """Counts the captions that really went through the LM backbone."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.rows = 0
        self.handle = encoder.backbone.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.rows += int(output.last_hidden_state.shape[0])

    def close(self) -> None:
        self.handle.remove()


def live_features(encoder, tokenizer, texts: list[str], batch: int, max_len: int = MAX_LEN) -> torch.Tensor:
    with torch.no_grad():
        parts = []
        for start in range(0, len(texts), batch):
            tokens = tokenize(tokenizer, texts[start:start + batch], max_len)
            parts.append(encoder.features(tokens["input_ids"], tokens["attention_mask"]))
    return torch.cat(parts)


def test_cached_features_equal_live_features_and_a_second_start_does_not_encode(encoder, tokenizer, tmp_path):
    shards = shard_set(tmp_path / "shards")
    counter = ForwardCounter(encoder)
    try:
        first = build(encoder, tokenizer, shards.root, tmp_path / "cache", batch_size=8)
        assert first.built and first.encoded == 30 and counter.rows == 30
        assert set(first.cache.texts) == all_texts(shards) and len(first.cache) == 30
        second = build(encoder, tokenizer, shards.root, tmp_path / "cache", batch_size=8)
        assert not second.built and second.encoded == 0 and counter.rows == 30  # loaded, not encoded
    finally:
        counter.close()
    assert second.cache.path == first.cache.path and first.cache.path.parent == tmp_path / "cache"
    assert torch.equal(second.cache.features, first.cache.features)
    # live features in other batch compositions (other padding), reversed order, train mode
    texts = sorted(all_texts(shards), reverse=True)
    encoder.train()
    try:
        assert not encoder.backbone.training  # a frozen LM never runs dropout, even in training
        live = live_features(encoder, tokenizer, texts, batch=7)
    finally:
        encoder.eval()
    cached = second.cache.lookup(texts)
    assert cached.shape == (30, encoder.hidden_size) and cached.dtype == torch.float32
    assert (cached - live).abs().max().item() <= 1e-6
    assert live.abs().max().item() > 0.1  # not a comparison of zeros


def test_a_caption_missing_from_the_cache_is_an_error_naming_it(encoder, tokenizer, tmp_path):
    shards = shard_set(tmp_path / "shards")
    cache = build(encoder, tokenizer, shards.root, tmp_path / "cache").cache
    with pytest.raises(tc.CaptionNotCached, match="a dog barks twice") as error:
        cache.lookup([cache.texts[0], "a dog barks twice"])
    assert str(cache.path) in str(error.value)


def test_key_follows_model_tokenizer_pooling_length_and_captions(encoder, tokenizer, tmp_path):
    shards = shard_set(tmp_path / "shards", sha256=True)
    manifest = shards.manifest
    content = tc.split_content(manifest, "train")

    def key(enc=encoder, tok=tokenizer, max_len=MAX_LEN, captions=content) -> str:
        return tc.cache_key(tc.cache_identity(enc.fingerprint(), tok, max_len, captions))

    base = key()
    # the same files in another folder keep the key; an edited tokenizer vocabulary changes it
    moved = tmp_path / "minilm-copy"
    shutil.copytree(embedded_model_dir(), moved, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for weights in embedded_model_dir().glob("*.safetensors"):
        (moved / weights.name).symlink_to(weights)
    assert key(minilm(model=str(moved))) == base
    with (moved / "vocab.txt").open("a", encoding="utf-8") as vocab:
        vocab.write("motioncachetoken\n")
    edited = minilm(model=str(moved))
    variants = {
        "tokenizer files": key(edited, load_tokenizer(edited.cfg)),
        "model (2 layers)": key(minilm(num_layers=2)),
        "pooling": key(minilm(pooling="cls")),
        "max_text_len": key(max_len=32),
        "captions": key(captions=tc.split_content(
            {**manifest, "splits": {"train": {"shards": [
                {**r, "sha256": "0" * 64} if i == 1 else r
                for i, r in enumerate(manifest["splits"]["train"]["shards"])]}}}, "train")),
    }
    assert all(variant != base for variant in variants.values()), variants
    assert len(set(variants.values())) == len(variants)
    # a changed key is another file: building it leaves the first one alone
    first = build(encoder, tokenizer, shards.root, tmp_path / "cache")
    shorter = build(encoder, tokenizer, shards.root, tmp_path / "cache", max_text_len=8)
    assert shorter.built and shorter.cache.path != first.cache.path and first.cache.path.is_file()
    assert first.cache.key == base and shorter.cache.key == key(max_len=8)


def test_with_shard_checksums_a_start_reads_no_shard(encoder, tokenizer, tmp_path):
    shards = shard_set(tmp_path / "shards", sha256=True)
    first = build(encoder, tokenizer, shards.root, tmp_path / "cache")
    for path in shards.shard_paths("train"):
        path.unlink()  # reading a shard now would fail
    again = build(encoder, tokenizer, shards.root, tmp_path / "cache")
    assert not again.built and again.cache.texts == first.cache.texts


@pytest.mark.parametrize("damage", ["flip-features", "flip-header", "flip-identity", "truncate"])
def test_a_corrupt_cache_is_rebuilt_with_a_warning_naming_it(encoder, tokenizer, tmp_path, caplog, damage):
    shards = shard_set(tmp_path / "shards")
    first = build(encoder, tokenizer, shards.root, tmp_path / "cache")
    path = first.cache.path
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    if damage == "flip-features":
        data[8 + header + 1000] ^= 0x01  # one bit in the data section (a feature: offsets take 248 bytes)
    elif damage == "flip-header":
        data[8 + header // 2] ^= 0x20
    elif damage == "flip-identity":  # valid JSON still, in metadata no load step reads: the checksum covers it
        at = data.index(b'"identity"', 8, 8 + header)
        at = data.index(b"pooling", at, 8 + header) + 1
        data[at] ^= 0x20  # "pooling" -> "pOoling"
    else:
        data = data[: len(data) * 2 // 3]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rehamot.training.text_cache"):
        again = build(encoder, tokenizer, shards.root, tmp_path / "cache")
    assert again.built and again.encoded == 30
    assert any(str(path) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert torch.equal(again.cache.features, first.cache.features)
    assert torch.equal(tc.load_cache(path, first.cache.key).features, first.cache.features)


def test_unusable_captions_are_counted_and_the_rest_kept(encoder, tokenizer, tmp_path, caplog):
    from data_fixtures import truncate_inside_sample

    shards = shard_set(tmp_path / "shards", bad={1: "json", 3: "no_captions", 6: "npy"})
    truncate_inside_sample(shards.shard_paths("train")[2], 1)  # the index still holds its captions
    with caplog.at_level(logging.WARNING, logger="rehamot.training.text_cache"):
        scan = tc.scan_captions(str(shards.root), "train")
    assert scan.bad == 2  # bad json, no captions (the indexes are read, not the tars)
    readable = [s for s in shards.ids["train"] if s not in ("000001", "000003")]
    assert scan.texts == {text for s in readable for _, text in shards.captions[s]}
    assert "train-000000.tar, 000001" in caplog.text and "train-000000.tar, 000003" in caplog.text
    with pytest.raises(BadSampleError, match="train-000000.tar, 000001"):
        tc.scan_captions(str(shards.root), "train", strict=True)
    result = build(encoder, tokenizer, shards.root, tmp_path / "cache")
    assert result.bad_samples == 2 and set(result.cache.texts) == scan.texts


def test_default_location_is_beside_writable_local_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    assert tc.default_cache_dir(str(shards), tmp_path / "runs") == shards / "text-cache"
    assert tc.default_cache_dir("https://example.org/shards", tmp_path / "runs") == tmp_path / "runs" / "text-cache"
    if os.geteuid() != 0:  # root can write anywhere
        shards.chmod(0o555)
        try:
            assert tc.default_cache_dir(str(shards), tmp_path / "runs") == tmp_path / "runs" / "text-cache"
        finally:
            shards.chmod(0o755)
    assert tc.cache_enabled(True, finetune_lm=False) and not tc.cache_enabled(True, finetune_lm=True)
    assert not tc.cache_enabled(False, finetune_lm=False)


@pytest.mark.slow
def test_two_rank_build_splits_the_work_and_equals_one_process(encoder, tokenizer, tmp_path):
    shards = shard_set(tmp_path / "shards", sha256=True)
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
         str(shards.root), str(tmp_path / "cache-2"), str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    # 30 captions in encode batches of 8: batches 0 and 2 (16 captions) on rank 0, 1 and 3 (14) on rank 1
    assert [r["encoded"] for r in ranks] == [16, 14] and [r["forwarded"] for r in ranks] == [16, 14]
    assert all(r["built"] for r in ranks) and ranks[0]["path"] == ranks[1]["path"]
    assert ranks[0]["texts_sha256"] == ranks[1]["texts_sha256"]
    assert not (tmp_path / "parts").exists()  # rank 0 removed the part files
    merged = tc.load_cache(Path(ranks[0]["path"]), ranks[0]["key"])
    single = build(encoder, tokenizer, shards.root, tmp_path / "cache-1", batch_size=8).cache
    assert merged.texts == single.texts and single.key == merged.key
    assert (merged.features - single.features).abs().max().item() <= 1e-6


def _rank_main(shards: str, cache_dir: str, out: str) -> None:
    """One rank of the 2-rank build (launched by torchrun from the test above)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    encoder = minilm()
    counter = ForwardCounter(encoder)
    result = tc.load_or_build(encoder, load_tokenizer(encoder.cfg), shards=shards, split="train",
                              cache_dir=cache_dir, max_text_len=MAX_LEN, rank=rank, world=world,
                              barrier=dist.barrier, parts_dir=Path(out).parent / "parts", batch_size=8)
    report = {"encoded": result.encoded, "forwarded": counter.rows, "built": result.built,
              "path": str(result.cache.path), "key": result.cache.key,
              "texts_sha256": tc.texts_digest(result.cache.texts)}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
