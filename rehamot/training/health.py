"""Signs that training has gone wrong: the logged loss statistics, and the bad-sample budget.

A run whose every negative is dropped, or whose loss is zero, still runs to the end and writes
its bundles: nothing fails, it just learns nothing. `TrainingHealth` is fed the global stats of
each logged step and returns the warnings to show, each code at most once per run, with the
likely cause and the setting to change.

The loaders skip and count the odd corrupt sample (data.strict=false); `check_bad_samples`
stops the run once they are more than data.max_bad_fraction of the samples read: a shard set
that is damaged, not a sample that is.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from rehamot.data.schema import ShardSetError

STREAK = 3  # logged steps in a row before a persistent condition is reported
ALL_DROPPED_RATE = 0.99

MESSAGES = {
    "all_negatives_dropped": (
        "DropTriple dropped more than {rate:.0%} of the candidate negatives on {streak} logged steps "
        "in a row (drop rate {value:.3f}): the loss has almost nothing to learn from. The embeddings "
        "are near-identical (an untrained or collapsed model) or the corpus's motions and captions "
        "are: raise loss.threshold_motion / loss.threshold_text (closer to 1), or warm up longer "
        "with loss.warmup_steps / loss.warmup_epochs"),
    "zero_loss": (
        "the loss was exactly 0 on {streak} logged steps in a row: no gradient reaches the model. "
        "Every negative is dropped or already beyond the margin: check loss.margin and the "
        "DropTriple thresholds (loss.threshold_motion, loss.threshold_text)"),
    "no_candidates": (
        "the loss had no candidate negatives at step {step}: every pair of the global batch "
        "shares one motion (a corpus of one motion, or a tiny batch): use a larger "
        "train.batch_size or more motions"),
}


@dataclass(frozen=True)
class HealthWarning:
    step: int
    code: str
    message: str

    def record(self) -> dict[str, object]:
        """The metrics.jsonl record of the warning."""
        return {"step": self.step, "warning": self.code, "message": self.message}


class TrainingHealth:
    """Fed the global stats of each logged step (`loss`, `drop_rate`, `candidates`)."""

    def __init__(self) -> None:
        self.streaks = {"all_negatives_dropped": 0, "zero_loss": 0}
        self.reported: set[str] = set()

    def observe(self, step: int, stats: Mapping[str, float]) -> list[HealthWarning]:
        """The warnings this logged step newly raises (each code once per run)."""
        drop_rate, loss = stats.get("drop_rate", math.nan), stats.get("loss", math.nan)
        found: dict[str, dict[str, object]] = {}
        # a drop rate not counted on this step (NaN) neither extends nor breaks the streak
        if not math.isnan(drop_rate):
            if self._streak("all_negatives_dropped", drop_rate > ALL_DROPPED_RATE):
                found["all_negatives_dropped"] = {"rate": ALL_DROPPED_RATE, "value": drop_rate}
        if self._streak("zero_loss", loss == 0.0):
            found["zero_loss"] = {}
        if stats.get("candidates", math.nan) == 0:
            found["no_candidates"] = {}
        return [self._warning(step, code, values) for code, values in found.items() if code not in self.reported]

    def _streak(self, code: str, condition: bool) -> bool:
        self.streaks[code] = self.streaks[code] + 1 if condition else 0
        return self.streaks[code] >= STREAK

    def _warning(self, step: int, code: str, values: dict[str, object]) -> HealthWarning:
        self.reported.add(code)
        return HealthWarning(step, code, MESSAGES[code].format(step=step, streak=STREAK, **values))


MIN_SAMPLES_READ = 100  # below this, one bad sample is too large a share to judge by


class BadSampleBudgetExceeded(ShardSetError):
    """Too many bad samples: the message (one line) names the shards they came from."""


def check_bad_samples(bad: int, read: int, max_fraction: float, shards: Mapping[str, int], where: str) -> None:
    """Raise BadSampleBudgetExceeded when `bad` of the `read` samples (all ranks) exceed the
    budget; `shards` counts this process's bad samples per shard file, `where` is the shard set."""
    if read < MIN_SAMPLES_READ or bad <= max_fraction * read:
        return
    named = ", ".join(f"{name} ({count})" for name, count in sorted(shards.items())) or "shards read by other ranks"
    raise BadSampleBudgetExceeded(
        f"{bad} of the {read} samples read were bad ({bad / read:.1%}), more than data.max_bad_fraction="
        f"{max_fraction:g}: stopping. Bad samples in {where}: {named}. `rehamot-shards verify {where}` "
        "checks every shard; restore or rebuild the damaged ones, or raise data.max_bad_fraction")
