"""Shard contract and streaming data pipeline.

`schema` (the shard contract and its index, shared with shards/), `plan` (epoch plans),
`pipeline` (the training stream; `batch_ring` hands batches from workers to the trainer),
`reading` (samples read through the shard index), `locations` (where shards live), `motion`,
`collate` (batches; the split's token table), `eval_set` (the exact evaluation set) and `leaks`
(train samples that duplicate val/test ones, within and across shard sets). May import the
foundation (`rehamot.config`) only; never rehamot.models: the tokenizer is passed in. The
re-exports below load lazily (PEP 562), so `import rehamot.data.schema` (what shards/ uses)
does not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "collate": ("collate_pairs", "motion_index", "pad_motions", "tokenize"),
    "eval_set": ("EvalCaption", "EvalSet"),
    "motion": ("eval_crop", "normalize", "random_crop", "random_window", "window_bounds"),
    "pipeline": ("DataConfig", "SlotStream", "TrainStream", "data_config", "preflight"),
    "plan": ("Segment", "SlotPlan", "plan_epoch", "shard_order", "steps_per_epoch"),
    "reading": ("BadSampleError", "read_manifest"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
