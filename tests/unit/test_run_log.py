"""What a run prints: plain lines in a log file, the warm-up named in the loss label."""
from __future__ import annotations

import io
import json

from rich.console import Console

from rehamot.training.run_log import RunLog, loss_label

RECORD = {"step": 5, "epoch": 0, "loss": 0.1234, "loss_name": "sh", "samples_per_s": 177.0, "data_wait_s": 0.002,
          "dropped_negatives": 3.0, "lr/motion": 1e-4}


def test_loss_label_names_the_warm_up_and_its_target():
    assert loss_label("sh", "mh") == "sh (warm-up → mh)"
    assert loss_label("mh", "mh") == "mh"
    assert loss_label("sh", None) == "sh"


def test_a_log_file_gets_one_plain_line_per_logged_step(tmp_path):
    out = io.StringIO()
    log = RunLog(tmp_path, total_steps=150, console=Console(file=out, force_terminal=False, width=80), loss_name="mh")
    log.step(4, None)  # not a logged step: nothing printed
    log.step(5, RECORD)
    log.step(10, {**RECORD, "step": 10, "loss_name": "mh"})
    log.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("step 5/150 | sh (warm-up → mh) 0.123 | 177/s") and "ETA" in lines[0]
    assert lines[1].startswith("step 10/150 | mh 0.123")
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_progress_in_a_log_file_is_a_start_and_an_end_line():
    from rehamot.progress import track

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=100)
    assert list(track(range(3), 3, "test split: encoding 9 motions", console=console)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines[0] == "test split: encoding 9 motions: 3 batches ..."
    assert lines[-1].startswith("test split: encoding 9 motions: 3 batches in ") and len(lines) == 2
    out.truncate(0)
    assert list(track(range(3), 3, "hidden", console=console, enabled=False)) == [0, 1, 2]  # other ranks
    assert "hidden" not in out.getvalue()
