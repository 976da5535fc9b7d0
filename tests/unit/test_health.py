"""TrainingHealth: which logged stats raise which warning, when, and only once per run."""
from __future__ import annotations

import math

import pytest

from rehamot.data.schema import ShardSetError
from rehamot.training.health import STREAK, TrainingHealth, check_bad_samples

HEALTHY = {"loss": 0.4, "drop_rate": 0.1, "candidates": 480.0}


def feed(health: TrainingHealth, rows: list[dict[str, float]], first_step: int = 1) -> list[tuple[int, str]]:
    return [(w.step, w.code) for step, row in enumerate(rows, start=first_step)
            for w in health.observe(step, {**HEALTHY, **row})]


def test_all_negatives_dropped_after_three_logged_steps_in_a_row_once():
    health = TrainingHealth()
    rows = [{"drop_rate": 1.0}] * 2 + [{}] + [{"drop_rate": 1.0}] * STREAK + [{"drop_rate": 1.0}] * 4
    assert feed(health, rows) == [(6, "all_negatives_dropped")]


def test_a_drop_rate_of_exactly_the_limit_is_not_all_dropped():
    assert feed(TrainingHealth(), [{"drop_rate": 0.99}] * 5) == []


def test_uncounted_drop_rates_neither_extend_nor_break_the_streak():
    rows = [{"drop_rate": 1.0}, {"drop_rate": math.nan}, {"drop_rate": 1.0}, {"drop_rate": math.nan}]
    assert feed(TrainingHealth(), rows) == []
    rows = [{"drop_rate": 1.0}, {"drop_rate": math.nan}, {"drop_rate": 1.0}, {"drop_rate": 1.0}]
    assert feed(TrainingHealth(), rows) == [(4, "all_negatives_dropped")]


def test_zero_loss_after_three_logged_steps_in_a_row():
    health = TrainingHealth()
    assert feed(health, [{"loss": 0.0}, {"loss": math.nan}, {"loss": 0.0}, {"loss": 0.0}]) == []
    assert feed(health, [{"loss": 0.0}], first_step=5) == [(5, "zero_loss")]
    assert feed(health, [{"loss": 0.0}] * 3, first_step=6) == []


def test_no_candidates_on_the_first_logged_step_without_any():
    health = TrainingHealth()
    assert feed(health, [{}, {"candidates": 0.0}, {"candidates": 0.0}]) == [(2, "no_candidates")]


def test_each_warning_names_its_cause_and_the_setting_to_change():
    health = TrainingHealth()
    warnings = [w for step in range(1, 4)
                for w in health.observe(step, {"loss": 0.0, "drop_rate": 1.0, "candidates": 0.0})]
    by_code = {w.code: w for w in warnings}
    assert set(by_code) == {"all_negatives_dropped", "zero_loss", "no_candidates"}
    assert "loss.threshold_motion" in by_code["all_negatives_dropped"].message
    assert "loss.margin" in by_code["zero_loss"].message
    assert "train.batch_size" in by_code["no_candidates"].message
    assert by_code["zero_loss"].record() == {"step": 3, "warning": "zero_loss",
                                             "message": by_code["zero_loss"].message}


def test_a_healthy_run_raises_nothing():
    assert feed(TrainingHealth(), [{}] * 20) == []


def test_bad_samples_within_the_budget_or_too_few_read_pass():
    check_bad_samples(1, 1000, 0.001, {"train-000003.tar": 1}, "data/x")  # exactly the budget
    check_bad_samples(50, 99, 0.001, {"train-000003.tar": 50}, "data/x")  # too few read to judge
    check_bad_samples(0, 10 ** 6, 0.0, {}, "data/x")


def test_bad_samples_over_the_budget_stop_naming_the_shards():
    with pytest.raises(ShardSetError) as err:  # the CLI's one-line refusal
        check_bad_samples(2, 1000, 0.001, {"train-000007.tar": 1, "train-000003.tar": 1}, "data/x")
    message = str(err.value)
    assert "2 of the 1000 samples" in message and "data.max_bad_fraction=0.001" in message
    assert "train-000003.tar (1), train-000007.tar (1)" in message and "\n" not in message
