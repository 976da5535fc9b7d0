"""The documented import path of the search index: `from rehamot.search_index import SearchIndex`.

The code lives in `rehamot.retrieval.index`; this module re-exports its public names.
"""
from rehamot.retrieval.index import (
    CaptionHit,
    MotionHit,
    MotionQueryResult,
    SearchError,
    SearchIndex,
    build_index,
)

__all__ = ["CaptionHit", "MotionHit", "MotionQueryResult", "SearchError", "SearchIndex", "build_index"]
