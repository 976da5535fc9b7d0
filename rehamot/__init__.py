"""rehamot: motion<->text retrieval with DropTriple over the global batch.

`from rehamot import load_bundle, Evaluator` loads lazily (PEP 562): `import rehamot` alone
does not import torch, so the light modules (config, metrics, shards) stay light.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {"load_bundle": "rehamot.models.bundle", "Evaluator": "rehamot.evaluation.generation_eval"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
