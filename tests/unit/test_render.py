"""Stick-figure rendering (rehamot/motion/stick_figure.py) and its command line (rehamot/render.py):
real GIF/PNG files from short motions, both input kinds, and one-line refusals of bad files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rehamot.motion.kinematics import LAYOUTS, features_to_joints
from rehamot.motion.stick_figure import KEYPOSE_DPI, KEYPOSE_PANEL_INCHES, load_motion, render_animation, render_keyposes
from shards.demo_actions import Plan, Unit
from shards.demo_corpus import build_motion

REPO = Path(__file__).resolve().parents[2]
# MMM (KIT-ML) joints borrowed from the nearest SMPL joints: a plausible 21-joint skeleton
KIT_FROM_SMPL = [0, 3, 6, 12, 15, 16, 18, 20, 17, 19, 21, 1, 4, 7, 10, 10, 2, 5, 8, 11, 11]


@pytest.fixture(scope="module")
def walk() -> np.ndarray:
    """HumanML3D features (28, 263) of a short demo walk (1.4 s at 20 fps)."""
    params = {"speed": "normal", "duration": 1.0, "amp": 1.0, "tempo": 1.0}
    features, _ = build_motion(Plan([Unit("walk_forward", params)], lead_s=0.2, tail_s=0.2))
    return features


def _save(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, array)
    return path


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "rehamot/render.py", *map(str, args)], check=False, cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_features_and_joints_files_give_the_same_motion(tmp_path, walk):
    joints, layout = load_motion(_save(tmp_path, "features.npy", walk))
    assert layout is LAYOUTS["humanml3d"] and joints.shape == (len(walk), 22, 3)
    from_joints, layout_again = load_motion(_save(tmp_path, "joints.npy", joints.astype(np.float32)))
    assert layout_again is layout
    np.testing.assert_allclose(from_joints, joints, atol=1e-6)
    np.testing.assert_allclose(joints, features_to_joints(walk))


def test_gif_has_one_frame_per_motion_frame_at_the_layout_rate(tmp_path, walk):
    joints, layout = load_motion(_save(tmp_path, "walk.npy", walk))
    out = render_animation(joints, layout, tmp_path / "walk.gif", title="a person walks forward")
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.is_animated
        assert gif.n_frames == len(walk)
        assert gif.info["duration"] == 50  # ms: 20 fps
        assert gif.size == (256, 256)


def test_kitml_joints_in_millimetres_render_at_12_5_fps(tmp_path, walk):
    """KIT-ML's joints come in millimetres: the view scales with the body."""
    kit = features_to_joints(walk)[:20, KIT_FROM_SMPL] * 1000.0
    joints, layout = load_motion(_save(tmp_path, "kit.npy", kit))
    assert layout is LAYOUTS["kitml"]
    out = render_animation(joints, layout, tmp_path / "kit.gif")
    with Image.open(out) as gif:
        assert gif.n_frames == 20 and gif.info["duration"] == 80
        gif.seek(10)
        frame = np.asarray(gif.convert("RGB"))
    drawn = (frame < 200).any(axis=-1)  # dark pixels: the figure, not just the pale floor grid
    assert 0.01 < drawn.mean() < 0.5


def test_keypose_strip_png_has_one_panel_per_pose(tmp_path, walk):
    joints = features_to_joints(walk)
    out = tmp_path / "strip.png"
    render_keyposes(joints, "humanml3d", out, poses=5, title="a person walks forward")
    width, height = KEYPOSE_PANEL_INCHES
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (round(5 * width * KEYPOSE_DPI), round(height * KEYPOSE_DPI))
        pixels = np.asarray(png.convert("RGB"))
    assert (pixels < 200).any(axis=-1).mean() > 0.005  # something was drawn


def test_keyposes_draw_into_a_given_axes(tmp_path, walk):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot([0, 1], [0, 1])
    joints = features_to_joints(walk)
    assert render_keyposes(joints, "humanml3d", poses=3, title="walk", ax=right) is right
    chains = len(LAYOUTS["humanml3d"].kinematic_chain)
    assert len(right.lines) == 3 * chains and right.get_title() == "walk"
    assert len(left.lines) == 1  # the other panel is untouched
    assert not list(tmp_path.iterdir())  # nothing written without out_path
    fig.savefig(tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 0


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_mp4_with_ffmpeg(tmp_path, walk):
    out = render_animation(features_to_joints(walk), "humanml3d", tmp_path / "walk.mp4")
    assert out.stat().st_size > 0 and out.read_bytes()[4:8] == b"ftyp"


@pytest.mark.skipif(shutil.which("ffmpeg") is not None, reason="ffmpeg is installed")
def test_mp4_without_ffmpeg_says_gif_works(tmp_path, walk):
    with pytest.raises(ValueError, match="needs ffmpeg.*gif works without it"):
        render_animation(features_to_joints(walk), "humanml3d", tmp_path / "walk.mp4")
    assert not (tmp_path / "walk.mp4").exists()


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    with_nan = np.zeros((10, 263))
    with_nan[4, 9] = np.nan
    files = {
        "1-D": _save(tmp_path, "oned.npy", np.zeros(263)),
        "wrong-width": _save(tmp_path, "wide.npy", np.zeros((10, 200))),
        "nan": _save(tmp_path, "nan.npy", with_nan),
        "zero-frames": _save(tmp_path, "empty.npy", np.zeros((0, 263))),
        "wrong-joint-count": _save(tmp_path, "joints.npy", np.zeros((10, 24, 3))),
        "unreadable": tmp_path / "junk.npy",
        "missing": tmp_path / "missing.npy",
    }
    files["unreadable"].write_bytes(b"this is not a numpy file")
    return files


BAD = ["1-D", "wrong-width", "nan", "zero-frames", "wrong-joint-count", "unreadable", "missing"]


@pytest.mark.parametrize("kind", BAD)
def test_load_motion_names_the_file_in_a_one_line_error(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ValueError) as caught:
        load_motion(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_load_motion_refuses_another_layout_and_pickles(tmp_path, walk):
    with pytest.raises(ValueError, match="251"):
        load_motion(_save(tmp_path, "walk.npy", walk), layout="kitml")
    pickled = tmp_path / "object.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object.npy"):
        load_motion(pickled)
    archive = tmp_path / "two.npz"
    np.savez(archive, a=walk, b=walk)
    with pytest.raises(ValueError, match="npz"):
        load_motion(archive)


def test_cli_writes_a_gif_and_a_png(tmp_path, walk):
    motion = _save(tmp_path, "walk.npy", walk)
    done = _cli(motion, "--out", tmp_path / "walk.gif", "--title", "a person walks", "--fps", "10")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == len(walk) and gif.info["duration"] == 100
    done = _cli(motion, "--out", tmp_path / "walk.png", "--poses", "4", "--layout", "humanml3d")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "walk.png").size[0] == round(4 * KEYPOSE_PANEL_INCHES[0] * KEYPOSE_DPI)


@pytest.mark.parametrize("kind", BAD[:4] + ["unreadable"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    done = _cli(path, "--out", tmp_path / "out.gif")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("render: ") and path.name in lines[0]
    assert not (tmp_path / "out.gif").exists()


def test_cli_refuses_an_unknown_output_type(tmp_path, walk):
    done = _cli(_save(tmp_path, "walk.npy", walk), "--out", tmp_path / "walk.avi")
    assert done.returncode == 2 and done.stderr.startswith("render: ") and ".gif" in done.stderr
    assert "Traceback" not in done.stderr


def test_importing_the_renderer_leaves_matplotlib_alone():
    """No backend switch (and no matplotlib import) until something is drawn."""
    code = "import sys, rehamot.motion.stick_figure, rehamot.render; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
