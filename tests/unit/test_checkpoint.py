from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rehamot.training import checkpoint as ckpt
from rehamot.training.lr_schedule import gated, lr_multiplier


def _fake_state(payload: str):
    def save_state(path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "state.txt"), "w") as f:
            f.write(payload)
    return save_state


def _save(run_dir, step, keep=2):
    return ckpt.save_checkpoint(run_dir, step, {"step": step}, _fake_state(f"s{step}"), lambda: None, True, keep=keep)


def test_save_latest_and_keep_last_k(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert names == ["step-00000020", "step-00000030"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000030"
    assert ckpt.read_position(latest) == {"step": 30}
    assert ckpt.resolve_resume("latest", tmp_path) == latest
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == latest


def test_latest_without_checkpoint_starts_fresh(tmp_path):
    assert ckpt.resolve_resume("latest", tmp_path) is None
    assert ckpt.resolve_resume(None, tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_killed_save_leaves_previous_checkpoint_usable(tmp_path):
    """kill -9 in the middle of a save: the partial folder is ignored, `latest` still works."""
    _save(tmp_path, 10)
    script = textwrap.dedent(f"""
        import os, time, sys
        sys.path.insert(0, {str(ckpt.__file__.rsplit('/rehamot/', 1)[0])!r})
        from rehamot.training import checkpoint as ckpt
        def slow_save(path):
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "state.txt"), "w").write("half")
            print("writing", flush=True)
            time.sleep(60)
        ckpt.save_checkpoint({str(tmp_path)!r}, 20, {{"step": 20}}, slow_save, lambda: None, True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "checkpoints" / "step-00000020.partial").is_dir()
    latest = ckpt.resolve_resume("latest", tmp_path)
    assert latest.name == "step-00000010"
    assert (latest / "state.txt").read_text() == "s10"
    # the next save clears the stale partial folder
    _save(tmp_path, 30)
    assert not (tmp_path / "checkpoints" / "step-00000020.partial").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000030"


def test_lr_schedules():
    step = lr_multiplier("step", 100, warmup_steps=0, decay_steps=[30, 60], decay_factor=0.1)
    assert [step(s) for s in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = lr_multiplier("cosine", 110, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    lm = gated(lr_multiplier("constant", 10), open_at=5)
    assert [lm(s) for s in (0, 4, 5)] == [0.0, 0.0, 1.0]


def _fake_run(root, name, with_checkpoint):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    if with_checkpoint:
        (run / "checkpoints" / "step-00000004").mkdir()
        (run / "checkpoints" / "step-00000004" / "position.json").write_text("{}")
    return run


def test_resume_latest_without_run_dir_finds_the_newest_run_with_a_checkpoint(tmp_path):
    from rehamot.config import load_config
    from rehamot.training.run_dir import choose_run_dir

    overrides = [f"run.root={tmp_path}", "run.name=demo", "resume=latest"]
    fresh, why = choose_run_dir(load_config(None, overrides))
    assert fresh.parent == tmp_path and fresh.name.startswith("demo-") and "starting fresh" in why
    _fake_run(tmp_path, "demo-20260101-000000", True)
    newest = _fake_run(tmp_path, "demo-20260102-000000", True)
    _fake_run(tmp_path, "demo-20260103-000000", False)  # started, never saved: nothing to resume
    _fake_run(tmp_path, "other-20260104-000000", True)  # another run's name
    chosen, why = choose_run_dir(load_config(None, overrides))
    assert chosen == newest and str(newest) in why
    assert choose_run_dir(load_config(None, [*overrides, f"run.dir={tmp_path / 'x'}"])) == (tmp_path / "x", None)
    new, why = choose_run_dir(load_config(None, overrides[:2]))  # no resume: always a new folder
    assert new not in (newest,) and why is None


def _flip_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_file_is_checksummed_and_a_flipped_byte_is_refused_naming_the_file(tmp_path):
    saved = _save(tmp_path, 10)
    listing = json.loads((saved / ckpt.CHECKSUM_FILE).read_text())
    assert set(listing["files"]) == {"state.txt", "position.json"}
    ckpt.verify_checkpoint(saved)
    _flip_byte(saved / "state.txt")
    with pytest.raises(ckpt.CheckpointError, match=r"state\.txt: checksum mismatch"):
        ckpt.resolve_resume(str(saved), tmp_path)
    (saved / "state.txt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"state\.txt: missing"):
        ckpt.verify_checkpoint(saved)
    (saved / ckpt.CHECKSUM_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="cannot be verified"):
        ckpt.verify_checkpoint(saved)


def test_latest_falls_back_to_the_newest_intact_checkpoint_with_a_warning(tmp_path, capsys):
    _save(tmp_path, 10, keep=3)
    older = _save(tmp_path, 20, keep=3)
    newest = _save(tmp_path, 30, keep=3)
    _flip_byte(newest / "state.txt")
    assert ckpt.resolve_resume("latest", tmp_path) == older
    warning = capsys.readouterr().err
    assert "WARNING" in warning and str(newest / "state.txt") in warning and str(older) in warning
    for checkpoint in ckpt.complete_checkpoints(tmp_path):
        _flip_byte(checkpoint / "position.json", offset=1)
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        ckpt.resolve_resume("latest", tmp_path)

