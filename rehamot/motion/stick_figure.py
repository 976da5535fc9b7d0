"""Stick-figure drawings of motions: animations (GIF, MP4) and key-pose strips (PNG).

For looking at data and at retrieval results: a motion file (HumanML3D/KIT-ML features or
joint positions, see `load_motion`) becomes a GIF that plays at the dataset's frame rate,
or a strip of key poses side by side for a paper, a model card, or a panel of an
evaluation figure (`render_keyposes` draws into a given matplotlib Axes).

Drawing conventions: the subject's left limbs and right limbs get two colours and the
spine/head a third (the same in both kinds of picture); the floor is a grid on y = 0 (or
lower if the motion goes below it); the animation's camera follows the root, and the root's
path so far is drawn on the floor. Coordinates are HumanML3D's (y up); they are shown
through a proper rotation, never a mirror, so a left hand stays a left hand.

Matplotlib is imported inside the functions and only its Agg canvas is used (no pyplot, no
global backend switch), so importing this module is cheap and changes nothing.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rehamot.motion.kinematics import LAYOUTS, Layout, features_to_joints, get_layout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
LEFT_COLOUR, RIGHT_COLOUR, CENTRE_COLOUR = "#D55E00", "#0072B2", "#333333"
FLOOR_COLOUR, PATH_COLOUR = "#BBBBBB", "#009E73"
ANIMATION_INCHES, ANIMATION_DPI = 3.2, 80  # 256 x 256 px: small GIFs, quick frames
KEYPOSE_PANEL_INCHES = (1.2, 2.4)  # width, height of one pose in a strip
KEYPOSE_DPI = 150
ANIMATION_SUFFIXES = (".gif", ".mp4")
STRIP_SUFFIXES = (".png", ".pdf", ".svg")


def as_layout(layout: str | Layout) -> Layout:
    return layout if isinstance(layout, Layout) else get_layout(layout)


def load_motion(path: str | Path, layout: str | Layout | None = None) -> tuple[np.ndarray, Layout]:
    """Joint positions (T, J, 3) float64 and their layout from a `.npy` file.

    The file holds features (T, 263) / (T, 251), converted with `features_to_joints`, or
    joint positions (T, 22, 3) / (T, 21, 3). Without `layout` it is inferred from the width
    or the joint count. Anything else is a ValueError whose one-line message names the file.
    """
    path = Path(path)
    array = _read_npy(path)
    try:
        expected = list(LAYOUTS.values()) if layout is None else [as_layout(layout)]
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"expected real numbers, got dtype {array.dtype}")
        if array.ndim == 2:
            spec = next((s for s in expected if array.shape[1] == s.feature_dim), None)
            if spec is None:
                raise ValueError(f"features of shape {array.shape}; expected "
                                 + " or ".join(f"(frames, {s.feature_dim}) for {s.name}" for s in expected))
            return features_to_joints(array, spec.name), spec
        if array.ndim == 3 and array.shape[2] == 3:
            spec = next((s for s in expected if array.shape[1] == s.joints), None)
            if spec is None:
                raise ValueError(f"joints of shape {array.shape}; expected "
                                 + " or ".join(f"(frames, {s.joints}, 3) for {s.name}" for s in expected))
            return check_joints(array, spec), spec
        raise ValueError(f"array of shape {array.shape}; expected features (frames, D) or joints "
                         "(frames, J, 3)")
    except ValueError as err:
        raise ValueError(f"{path}: {_one_line(err)}") from None


def _read_npy(path: Path) -> np.ndarray:
    """The one array in a .npy file; a ValueError naming the file for anything else."""
    try:
        with path.open("rb") as stream:
            magic = stream.read(6)
            if magic == b"\x93NUMPY":
                stream.seek(0)
                return np.load(stream, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: cannot read it as a .npy array ({_one_line(err)})") from None
    # np.load would otherwise try the file as a pickle or an .npz archive
    kind = "an .npz archive" if magic.startswith(b"PK") else "not a .npy file"
    raise ValueError(f"{path}: {kind}; expected one .npy array")


def check_joints(joints: np.ndarray, layout: str | Layout) -> np.ndarray:
    """Joints as float64 (T, J, 3), or a ValueError saying what is wrong with them."""
    spec = as_layout(layout)
    array = np.asarray(joints)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"joints must be real numbers, got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[1:] != (spec.joints, 3):
        raise ValueError(f"{spec.name} joints must have shape (frames, {spec.joints}, 3), got {array.shape}")
    if len(array) == 0:
        raise ValueError("joints have zero frames")
    if not np.isfinite(array).all():
        raise ValueError("joints contain NaN or infinite values")
    return array.astype(np.float64)


def render_animation(joints: np.ndarray, layout: str | Layout, out_path: str | Path,
                     fps: float | None = None, title: str | None = None) -> Path:
    """Write an animated stick figure to `out_path` (.gif: Pillow; .mp4: needs ffmpeg).

    One output frame per motion frame, played at `fps` (default: the layout's frame rate).
    """
    spec = as_layout(layout)
    joints = check_joints(joints, spec)
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise ValueError(f"{out_path}: an animation is written as {' or '.join(ANIMATION_SUFFIXES)}")
    fps = spec.fps if fps is None else float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")

    from matplotlib import animation
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    if suffix == ".mp4":
        if shutil.which("ffmpeg") is None:
            raise ValueError("writing .mp4 needs ffmpeg on PATH; .gif works without it")
        # yuv420p: the pixel format every player accepts (needs even width and height)
        writer: Any = animation.FFMpegWriter(fps=fps, codec="libx264", extra_args=["-pix_fmt", "yuv420p"])
    else:
        writer = animation.PillowWriter(fps=fps)

    fig = _new_figure((ANIMATION_INCHES, ANIMATION_INCHES))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.92 if title else 1)
    if title:
        fig.suptitle(title, fontsize=9)
    ax = fig.add_subplot(projection="3d")
    ax.set_axis_off()
    ax.view_init(elev=12, azim=-60)
    floor = min(0.0, float(joints[..., 1].min()))
    height = max(float(joints[..., 1].max()) - floor, 1e-6)  # the body sets the scale (m or mm)
    radius = 0.55 * height  # half the floor window's side
    ax.set_zlim(floor, floor + height)
    ax.set_box_aspect((2 * radius, 2 * radius, height), zoom=1.5)  # equal scale on all axes

    spacing = _nice_step(radius / 3)
    root = joints[:, 0]
    grid = Line3DCollection(_floor_grid(root[0, 0] - radius, root[0, 0] + radius, root[0, 2] - radius,
                                        root[0, 2] + radius, floor, spacing),
                            colors=FLOOR_COLOUR, linewidths=0.6)
    ax.add_collection3d(grid)
    path_line, = ax.plot([], [], [], color=PATH_COLOUR, linewidth=1.2)
    bones = [ax.plot([], [], [], color=colour, linewidth=2.2, marker="o", markersize=2,
                     solid_capstyle="round")[0]
             for colour in _chain_colours(spec)]
    clock = fig.text(0.02, 0.02, "", fontsize=7, color="#555555")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with writer.saving(fig, str(out_path), dpi=ANIMATION_DPI):
        for t in range(len(joints)):
            cx, cz = root[t, 0], root[t, 2]
            lo_x, hi_x, lo_z, hi_z = cx - radius, cx + radius, cz - radius, cz + radius
            ax.set_xlim(lo_x, hi_x)
            ax.set_ylim(-hi_z, -lo_z)  # plot Y is world -z (see _to_plot_xyz)
            grid.set_segments(_floor_grid(lo_x, hi_x, lo_z, hi_z, floor, spacing))
            # the path so far, hidden where it leaves the window (mplot3d does not clip)
            trail = root[: t + 1].copy()
            trail[:, 1] = floor
            outside = (np.abs(trail[:, 0] - cx) > radius) | (np.abs(trail[:, 2] - cz) > radius)
            trail[outside] = np.nan
            path_line.set_data_3d(*_to_plot_xyz(trail))
            for line, chain in zip(bones, spec.kinematic_chain):
                line.set_data_3d(*_to_plot_xyz(joints[t, list(chain)]))
            clock.set_text(f"{t / fps:5.2f} s")
            writer.grab_frame()
    return out_path


def render_keyposes(joints: np.ndarray, layout: str | Layout, out_path: str | Path | None = None,
                    poses: int = 6, title: str | None = None, ax: Axes | None = None) -> Axes:
    """Draw `poses` evenly spaced frames (first and last included) side by side.

    Each pose stands on its own floor shadow, centred on its root, seen from the front-left
    of the subject's initial facing (the animation's camera direction) and labelled with its
    time. Draws into `ax` (a 2-D Axes, e.g. a panel of an evaluation figure) or into a new
    figure of `KEYPOSE_PANEL_INCHES` per pose. With `out_path` (.png, .pdf, .svg) the figure
    is written there: the new one, or the whole figure holding `ax`. Returns the Axes.
    """
    spec = as_layout(layout)
    joints = check_joints(joints, spec)
    if isinstance(poses, bool) or not isinstance(poses, (int, np.integer)) or poses < 1:
        raise ValueError(f"poses must be a positive whole number, got {poses!r}")
    if out_path is not None:
        out_path = Path(out_path)
        if out_path.suffix.lower() not in STRIP_SUFFIXES:
            raise ValueError(f"{out_path}: a key-pose strip is written as {', '.join(STRIP_SUFFIXES)}")
    frames = np.unique(np.linspace(0, len(joints) - 1, int(poses)).round().astype(int))

    fig = None
    if ax is None:
        panel_w, panel_h = KEYPOSE_PANEL_INCHES
        fig = _new_figure((panel_w * len(frames), panel_h))
        ax = fig.add_axes((0, 0, 1, 0.88 if title else 1))
    ax.set_axis_off()
    ax.set_aspect("equal", adjustable="box")

    floor = min(0.0, float(joints[..., 1].min()))
    height = max(float(joints[..., 1].max()) - floor, 1e-6)
    bottom, top = -0.2 * height, 1.1 * height  # room for the time labels below the floor
    width = (top - bottom) * KEYPOSE_PANEL_INCHES[0] / KEYPOSE_PANEL_INCHES[1]
    right, up, forward = _camera(azimuth=math.radians(30), elevation=math.radians(10))
    colours = _chain_colours(spec)
    shadow = np.stack([np.cos(a := np.linspace(0, 2 * np.pi, 33)), np.zeros_like(a), np.sin(a)], -1)
    shadow *= 0.22 * height
    for slot, t in enumerate(frames):
        pose = joints[t] - joints[t, 0] * [1.0, 0.0, 1.0]  # centred on the root's xz
        pose[:, 1] -= floor
        offset = slot * width
        ground = shadow @ np.stack([right, up], axis=1)
        ax.fill(ground[:, 0] + offset, ground[:, 1], color="#E6E6E6", zorder=0, linewidth=0)
        depth = pose @ forward
        screen = pose @ np.stack([right, up], axis=1)
        # far limbs first, so nearer ones overlap them
        order = sorted(range(len(spec.kinematic_chain)),
                       key=lambda c: -depth[list(spec.kinematic_chain[c])].mean())
        for rank, c in enumerate(order):
            chain = list(spec.kinematic_chain[c])
            ax.plot(screen[chain, 0] + offset, screen[chain, 1], color=colours[c], linewidth=2.0,
                    solid_capstyle="round", solid_joinstyle="round", zorder=2 + rank)
        ax.text(offset, -0.12 * height, f"{t / spec.fps:.1f} s", ha="center", va="top",
                fontsize=7, color="#555555")
    ax.set_xlim(-width / 2, (len(frames) - 0.5) * width)
    ax.set_ylim(bottom, top)
    if title:
        ax.set_title(title, fontsize=9)
    if out_path is not None:
        target_fig = fig if fig is not None else ax.figure
        out_path.parent.mkdir(parents=True, exist_ok=True)
        target_fig.savefig(out_path, dpi=KEYPOSE_DPI)
    return ax


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on matplotlib's Agg canvas, chosen here rather than through pyplot's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _chain_colours(spec: Layout) -> list[str]:
    return [LEFT_COLOUR if i in spec.left_chains else RIGHT_COLOUR if i in spec.right_chains
            else CENTRE_COLOUR for i in range(len(spec.kinematic_chain))]


def _to_plot_xyz(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (N, 3), y up, as matplotlib's X, Y, Z (Z up): X = x, Y = -z, Z = y.

    A rotation about the x axis (determinant +1); plotting (x, z, y) would mirror the body.
    """
    return points[:, 0], -points[:, 2], points[:, 1]


def _floor_grid(lo_x: float, hi_x: float, lo_z: float, hi_z: float, floor: float,
                spacing: float) -> list[np.ndarray]:
    """Grid lines fixed in the world (so they slide past as the camera follows the root),
    cut to the window [lo_x, hi_x] x [lo_z, hi_z]."""
    segments = []
    for x in np.arange(math.ceil(lo_x / spacing), math.floor(hi_x / spacing) + 1) * spacing:
        segments.append(np.array([[x, floor, lo_z], [x, floor, hi_z]]))
    for z in np.arange(math.ceil(lo_z / spacing), math.floor(hi_z / spacing) + 1) * spacing:
        segments.append(np.array([[lo_x, floor, z], [hi_x, floor, z]]))
    return [np.stack(_to_plot_xyz(s), axis=-1) for s in segments]


def _nice_step(size: float) -> float:
    """The 1, 2 or 5 times a power of ten nearest below `size` (grid spacing in data units)."""
    power = 10.0 ** math.floor(math.log10(size))
    return max(m for m in (1.0, 2.0, 5.0) if m * power <= size) * power


def _camera(azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Screen right, screen up and viewing direction (unit world vectors) of a camera at
    `azimuth` from +z towards +x and `elevation` above the floor, looking at the origin.
    At azimuth 0 it faces a subject who faces +z, whose left (+x) is then on screen right."""
    towards_camera = np.array([math.sin(azimuth) * math.cos(elevation), math.sin(elevation),
                               math.cos(azimuth) * math.cos(elevation)])
    forward = -towards_camera
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    return right, np.cross(right, forward), forward


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
