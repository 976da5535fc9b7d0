"""Parameterised atomic actions of the demo corpus and how they chain into one motion.

Each action turns a parameter dict into a pose track (T, NUM_CHANNELS) of joint angles and
root velocities (see `demo_skeleton`) that starts and ends at the rest pose, so chained
actions blend without jumps. All randomness is in the samplers (`sample_plan`); building a
track from a plan is a pure function. Parameters in words: speed (slow/normal/fast), reps,
side (left/right, sometimes both), direction, angle, variant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shards.demo_features import gaussian_smooth
from shards.demo_skeleton import ARM_CHANNELS, CH, FPS, NUM_CHANNELS, side_channel

SPEED_FACTOR = {"slow": 0.7, "normal": 1.0, "fast": 1.4}
MAX_SECONDS = 9.8  # the converter's default --max-frames is 196 at 20 fps: nothing is cropped
MIN_SECONDS = 2.0  # its --min-frames is 40
UNIT_OVERLAP_S = 0.15
SMOOTH_SIGMA_FRAMES = 1.0

Params = dict[str, Any]


@dataclass(frozen=True)
class Unit:
    """One step of a motion: an action, optionally with a gesture performed at the same time."""

    action: str
    params: Params
    overlay: tuple[str, Params] | None = None


@dataclass
class Plan:
    units: list[Unit]
    lead_s: float = 0.3
    tail_s: float = 0.3
    segments: list[tuple[int, int]] = field(default_factory=list)  # frames, filled by synthesize


# ----------------------------------------------------------------------------- helpers

def _times(seconds: float) -> np.ndarray:
    return np.arange(max(int(round(seconds * FPS)), 2)) / FPS


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _envelope(t: np.ndarray, ramp: float = 0.3) -> np.ndarray:
    """0 at both ends, 1 in the middle: actions fade in and out of the rest pose."""
    return _smoothstep(t / ramp) * _smoothstep((t[-1] - t) / ramp)


def _keys(t: np.ndarray, times: list[float], values: list[float]) -> np.ndarray:
    """Smoothstep interpolation through keyframes (zero slope at every key)."""
    times_a, values_a = np.asarray(times, float), np.asarray(values, float)
    seg = np.clip(np.searchsorted(times_a, t, side="right") - 1, 0, len(times_a) - 2)
    t0, t1 = times_a[seg], times_a[seg + 1]
    s = _smoothstep((t - t0) / np.maximum(t1 - t0, 1e-9))
    return values_a[seg] + (values_a[seg + 1] - values_a[seg]) * s


def _bump(t: np.ndarray, start: float, end: float, height: float) -> np.ndarray:
    """Parabolic flight between start and end (seconds), peak `height`."""
    s = (t - start) / (end - start)
    return np.where((s > 0) & (s < 1), 4.0 * height * s * (1.0 - s), 0.0)


def _sign(side: str) -> float:
    return 1.0 if side == "left" else -1.0


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def _sides(side: str) -> tuple[str, ...]:
    return ("left", "right") if side == "both" else (side,)


def _track(t: np.ndarray) -> np.ndarray:
    return np.zeros((len(t), NUM_CHANNELS))


def _gait(
    t: np.ndarray, freq: float, hip: float, knee: float, arm: float, elbow: float,
    knee_base: float = 0.05, high_knee: bool = False, backward: bool = False, air: float = 0.0,
) -> np.ndarray:
    """Alternating legs and counter-swinging arms at stride frequency `freq` (Hz)."""
    tr = _track(t)
    phase = 2.0 * math.pi * freq * t
    swing = np.sin(phase)
    lift = -np.cos(phase) if backward else np.cos(phase)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        if high_knee:
            tr[:, side_channel(side, "hip_flex")] = hip * np.clip(sgn * swing, 0, None)
            tr[:, side_channel(side, "knee")] = knee * np.clip(sgn * swing, 0, None)
        else:
            tr[:, side_channel(side, "hip_flex")] = sgn * hip * swing
            tr[:, side_channel(side, "knee")] = knee_base + knee * np.clip(sgn * lift, 0, None)
            tr[:, side_channel(side, "ankle")] = 0.15 * sgn * swing
        tr[:, side_channel(side, "sh_flex")] = -sgn * arm * swing
        tr[:, side_channel(side, "elbow")] = elbow + 0.15 * arm * (1.0 + sgn * swing)
    tr[:, CH["twist"]] = 0.06 * swing * (1.0 + arm)
    if air:
        tr[:, CH["air"]] = air * np.clip(np.sin(2.0 * phase), 0, None)
    return tr


def _finish(tr: np.ndarray, t: np.ndarray, ramp: float = 0.3) -> np.ndarray:
    return tr * _envelope(t, ramp)[:, None]


# ----------------------------------------------------------------------------- actions

def _walk_forward(p: Params) -> np.ndarray:
    sf, t = SPEED_FACTOR[p["speed"]], _times(p["duration"])
    tr = _gait(t, 0.9 * sf / p["tempo"], 0.3 + 0.12 * sf, 0.95, 0.3 * sf, 0.25)
    tr[:, CH["vel_fwd"]] = 1.25 * sf**1.2 * p["amp"]
    tr[:, CH["lean"]] = 0.04 * sf
    return _finish(tr, t)


def _walk_backward(p: Params) -> np.ndarray:
    sf, t = SPEED_FACTOR[p["speed"]], _times(p["duration"])
    tr = _gait(t, 0.75 * sf / p["tempo"], 0.35, 0.8, 0.2, 0.3, backward=True)
    tr[:, CH["vel_fwd"]] = -0.7 * sf * p["amp"]
    tr[:, CH["lean"]] = -0.05
    return _finish(tr, t)


def _run_forward(p: Params) -> np.ndarray:
    sf, t = SPEED_FACTOR[p["speed"]], _times(p["duration"])
    tr = _gait(t, 1.35 * sf**0.5 / p["tempo"], 0.7, 1.5, 0.6, 1.5, knee_base=0.3, air=0.06)
    tr[:, CH["vel_fwd"]] = 3.0 * sf * p["amp"]
    tr[:, CH["lean"]] = 0.15 + 0.05 * sf
    return _finish(tr, t)


def _jog_in_place(p: Params) -> np.ndarray:
    sf, t = SPEED_FACTOR[p["speed"]], _times(p["duration"])
    tr = _gait(t, 1.3 * sf**0.5 / p["tempo"], 0.6, 1.4, 0.4, 1.4, high_knee=True, air=0.05)
    return _finish(tr, t)


def _march_in_place(p: Params) -> np.ndarray:
    sf, t = SPEED_FACTOR[p["speed"]], _times(p["duration"])
    tr = _gait(t, 0.75 * sf / p["tempo"], 1.1 * p["amp"], 1.3, 0.6, 0.3, high_knee=True)
    return _finish(tr, t)


def _side_step(p: Params) -> np.ndarray:
    sf, t = SPEED_FACTOR[p["speed"]], _times(p["duration"])
    tr = _track(t)
    phase = 2.0 * math.pi * 0.8 * sf / p["tempo"] * t
    lead, trail = p["side"], _other(p["side"])
    tr[:, side_channel(lead, "hip_abd")] = 0.28 * np.clip(np.sin(phase), 0, None)
    tr[:, side_channel(trail, "hip_abd")] = 0.18 * np.clip(-np.sin(phase), 0, None)
    for side in ("left", "right"):
        tr[:, side_channel(side, "knee")] = 0.25 * np.abs(np.sin(phase))
        tr[:, side_channel(side, "sh_abd")] = 0.12 + 0.08 * np.sin(phase)
    tr[:, CH["vel_side"]] = 0.6 * sf * _sign(p["side"]) * p["amp"]
    return _finish(tr, t)


def _yaw_profile(t: np.ndarray, angle: float) -> np.ndarray:
    """Yaw rate (rad/s) that turns by exactly `angle` with a smooth start and stop."""
    bell = _envelope(t, ramp=max(t[-1] / 2.0, 0.1))
    return angle * bell / (bell.sum() / FPS)


def _turn(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    tr = _gait(t, 1.0 / p["tempo"], 0.18, 0.5, 0.1, 0.2)
    tr[:, CH["yaw_rate"]] = _yaw_profile(t, math.radians(p["angle"]) * _sign(p["side"]))
    return _finish(tr, t, ramp=0.2)


def _walk_circle(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    tr = _gait(t, 0.85 / p["tempo"], 0.38, 0.9, 0.25, 0.25)
    tr[:, CH["vel_fwd"]] = 1.0 * p["amp"]
    tr[:, CH["yaw_rate"]] = _yaw_profile(t, 2.0 * math.pi * _sign(p["side"]))
    return _finish(tr, t)


def _spin(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    tr = _gait(t, 1.5 / p["tempo"], 0.15, 0.45, 0.0, 0.4)
    for side in ("left", "right"):
        tr[:, side_channel(side, "sh_abd")] = 0.7 * p["amp"]
    tr[:, CH["yaw_rate"]] = _yaw_profile(t, 2.0 * math.pi * p["reps"] * _sign(p["side"]))
    return _finish(tr, t, ramp=0.25)


def _repeat(t: np.ndarray, period: float) -> np.ndarray:
    """Time within the current repetition (seconds)."""
    return np.mod(t, period)


def _jump(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    s = _repeat(t, period) / period
    keys = [0.0, 0.28, 0.45, 0.62, 0.78, 1.0]  # crouch, take off, fly, land, recover
    tr = _track(t)
    for side in ("left", "right"):
        tr[:, side_channel(side, "hip_flex")] = _keys(s, keys, [0, 0.75, 0.1, 0.35, 0.65, 0])
        tr[:, side_channel(side, "knee")] = _keys(s, keys, [0, 1.25, 0.1, 0.6, 1.05, 0])
        tr[:, side_channel(side, "ankle")] = _keys(s, keys, [0, 0.4, -0.4, 0, 0.3, 0])
        tr[:, side_channel(side, "sh_flex")] = _keys(s, keys, [0, -0.5, 1.4, 1.0, 0.3, 0])
    tr[:, CH["lean"]] = _keys(s, keys, [0, 0.4, 0.0, 0.1, 0.35, 0])
    height = (0.32 if p["direction"] == "up" else 0.25) * p["amp"]
    tr[:, CH["air"]] = _bump(s, 0.42, 0.65, height)
    if p["direction"] == "forward":
        flight = 0.23 * period
        tr[:, CH["vel_fwd"]] = np.where((s > 0.42) & (s < 0.65), 0.8 * p["amp"] / flight, 0.0)
    return _finish(tr, t, ramp=0.15)


def _hop_one_leg(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    s = _repeat(t, period) / period
    stance, lifted = p["side"], _other(p["side"])
    tr = _track(t)
    tr[:, side_channel(lifted, "hip_flex")] = 0.35
    tr[:, side_channel(lifted, "knee")] = 1.6
    tr[:, side_channel(stance, "knee")] = _keys(s, [0, 0.25, 0.4, 0.75, 1.0], [0.1, 0.5, 0.05, 0.5, 0.1])
    tr[:, side_channel(stance, "ankle")] = _keys(s, [0, 0.25, 0.4, 0.75, 1.0], [0, 0.3, -0.4, 0.3, 0])
    for side in ("left", "right"):
        tr[:, side_channel(side, "sh_abd")] = 0.5
        tr[:, side_channel(side, "elbow")] = 0.5
    tr[:, CH["air"]] = _bump(s, 0.35, 0.7, 0.12 * p["amp"])
    return _finish(tr, t)


def _jumping_jacks(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    s = _repeat(t, period) / period
    tr = _track(t)
    opened = _keys(s, [0, 0.15, 0.45, 0.65, 0.95, 1.0], [0, 0, 1, 1, 0, 0])
    for side in ("left", "right"):
        tr[:, side_channel(side, "sh_abd")] = 2.7 * opened * p["amp"]
        tr[:, side_channel(side, "hip_abd")] = 0.3 * opened
        tr[:, side_channel(side, "knee")] = 0.2 * (1.0 - np.cos(4 * math.pi * s)) / 2.0
    tr[:, CH["air"]] = _bump(s, 0.15, 0.4, 0.08) + _bump(s, 0.65, 0.9, 0.08)
    return tr  # every channel is back at rest when a repetition ends


def _squat(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    s = _repeat(t, period) / period
    keys = [0.0, 0.4, 0.6, 1.0]
    depth = p["amp"]
    tr = _track(t)
    for side in ("left", "right"):
        tr[:, side_channel(side, "hip_flex")] = _keys(s, keys, [0, 1.6 * depth, 1.6 * depth, 0])
        tr[:, side_channel(side, "knee")] = _keys(s, keys, [0, 2.0 * depth, 2.0 * depth, 0])
        tr[:, side_channel(side, "ankle")] = _keys(s, keys, [0, 0.45, 0.45, 0])
        tr[:, side_channel(side, "sh_flex")] = _keys(s, keys, [0, 1.4, 1.4, 0])
    tr[:, CH["lean"]] = _keys(s, keys, [0, 0.45, 0.45, 0])
    return _finish(tr, t, ramp=0.15)


def _sit(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    keys = [0.0, 1.0, 1.5, d - 1.5, d - 0.9, d]
    tr = _track(t)
    for side in ("left", "right"):
        tr[:, side_channel(side, "hip_flex")] = _keys(t, keys, [0, 1.6, 1.55, 1.55, 1.6, 0])
        tr[:, side_channel(side, "knee")] = _keys(t, keys, [0, 1.6, 1.55, 1.55, 1.6, 0])
        tr[:, side_channel(side, "ankle")] = _keys(t, keys, [0, 0.15, 0.05, 0.05, 0.2, 0])
        tr[:, side_channel(side, "sh_flex")] = _keys(t, keys, [0, 0.5, 0.35, 0.35, 0.6, 0])
        tr[:, side_channel(side, "elbow")] = _keys(t, keys, [0, 0.3, 0.6, 0.6, 0.3, 0])
    tr[:, CH["lean"]] = _keys(t, keys, [0, 0.4, 0.05, 0.05, 0.5, 0])
    return tr


def _bow(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    depth = 1.35 if p["variant"] == "deep" else 0.8
    keys = [0.0, 0.35 * d, 0.65 * d, d]
    tr = _track(t)
    tr[:, CH["lean"]] = _keys(t, keys, [0, depth, depth, 0])
    tr[:, CH["neck_pitch"]] = _keys(t, keys, [0, 0.3, 0.3, 0])
    for side in ("left", "right"):  # arms keep hanging while the torso bends
        tr[:, side_channel(side, "sh_flex")] = 0.85 * tr[:, CH["lean"]]
    return tr


def _kick(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    s = _repeat(t, period) / period
    keys = [0.0, 0.25, 0.45, 0.65, 1.0]
    tr = _track(t)
    kicker = p["side"]
    tr[:, side_channel(kicker, "hip_flex")] = _keys(s, keys, [0, 0.9, 1.45 * p["amp"], 0.8, 0])
    tr[:, side_channel(kicker, "knee")] = _keys(s, keys, [0, 1.5, 0.1, 1.2, 0])
    tr[:, side_channel(kicker, "ankle")] = _keys(s, keys, [0, 0, -0.5, 0, 0])
    tr[:, side_channel(_other(kicker), "knee")] = 0.15
    tr[:, CH["lean"]] = _keys(s, keys, [0, -0.1, -0.25, -0.1, 0])
    for side in ("left", "right"):
        tr[:, side_channel(side, "sh_abd")] = 0.35
        tr[:, side_channel(side, "elbow")] = 0.6
    return _finish(tr, t, ramp=0.2)


def _punch(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    rep = np.minimum((t // period).astype(int), p["reps"] - 1)
    s = _repeat(t, period) / period
    tr = _track(t)
    for side in ("left", "right"):  # guard
        tr[:, side_channel(side, "sh_flex")] = 0.5
        tr[:, side_channel(side, "elbow")] = 2.1
    extend = _keys(s, [0, 0.25, 0.45, 1.0], [0, 1, 1, 0])
    for side in ("left", "right"):
        if p["side"] == "both":  # alternate, starting with the right
            active = (rep % 2 == 0) == (side == "right")
        else:
            active = np.full(len(t), side == p["side"])
        ext = np.where(active, extend, 0.0)
        tr[:, side_channel(side, "sh_flex")] += 1.0 * ext * p["amp"]
        tr[:, side_channel(side, "elbow")] -= 2.05 * ext
        tr[:, CH["twist"]] -= 0.3 * _sign(side) * ext
    return _finish(tr, t, ramp=0.25)


def _throw(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    s = t / t[-1]
    keys = [0.0, 0.4, 0.55, 0.72, 1.0]
    arm, sgn = p["side"], _sign(p["side"])
    tr = _track(t)
    tr[:, side_channel(arm, "sh_abd")] = _keys(s, keys, [0, 1.5, 0.3, 0.2, 0])
    tr[:, side_channel(arm, "sh_flex")] = _keys(s, keys, [0, 0.3, 2.3, 1.0, 0])
    tr[:, side_channel(arm, "elbow")] = _keys(s, keys, [0, 1.8, 0.2, 0.4, 0])
    tr[:, CH["twist"]] = _keys(s, keys, [0, 0.5 * sgn, -0.4 * sgn, -0.3 * sgn, 0])
    tr[:, CH["lean"]] = _keys(s, keys, [0, -0.1, 0.3, 0.35, 0])
    tr[:, side_channel(_other(arm), "hip_flex")] = _keys(s, keys, [0, 0.3, 0.2, 0.1, 0])
    return tr


def _wave(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    raised = _keys(t, [0.0, 0.6, d - 0.6, d], [0, 1, 1, 0])
    waving = np.sin(2.0 * math.pi * 2.0 / p["tempo"] * t) * _smoothstep((t - 0.4) / 0.3)
    tr = _track(t)
    for arm in _sides(p["side"]):
        tr[:, side_channel(arm, "sh_flex")] = 2.3 * raised
        tr[:, side_channel(arm, "sh_abd")] = (0.6 + 0.35 * waving * p["amp"]) * raised
        tr[:, side_channel(arm, "elbow")] = (0.6 + 0.25 * waving) * raised
    return tr


def _raise_hand(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    raised = _keys(t, [0.0, 0.7, d - 0.7, d], [0, 1, 1, 0])
    tr = _track(t)
    for arm in _sides(p["side"]):
        tr[:, side_channel(arm, "sh_flex")] = 2.85 * p["amp"] * raised
        tr[:, side_channel(arm, "elbow")] = 0.15 * raised
        tr[:, side_channel(arm, "collar")] = 0.25 * raised
    return tr


def _clap(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    raised = _keys(t, [0.0, 0.5, d - 0.5, d], [0, 1, 1, 0])
    period = (d - 1.0) / p["reps"]
    opening = 0.5 - 0.5 * np.cos(2.0 * math.pi * np.clip(t - 0.5, 0, None) / period)
    tr = _track(t)
    for side in ("left", "right"):
        tr[:, side_channel(side, "sh_flex")] = 1.25 * raised
        tr[:, side_channel(side, "elbow")] = 0.9 * raised
        tr[:, side_channel(side, "sh_abd")] = (0.55 * opening - 0.15) * raised
    return tr


def _arm_circles(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    omega = 2.0 * math.pi * 1.2 / p["tempo"]
    tr = _track(t)
    for arm in _sides(p["side"]):
        tr[:, side_channel(arm, "sh_abd")] = 1.45 + 0.35 * p["amp"] * np.sin(omega * t)
        tr[:, side_channel(arm, "sh_flex")] = 0.35 * p["amp"] * np.cos(omega * t)
    return _finish(tr, t, ramp=0.5)


def _stretch(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    up = _keys(t, [0.0, 0.8, d - 0.8, d], [0, 1, 1, 0])
    tr = _track(t)
    for side in ("left", "right"):
        tr[:, side_channel(side, "sh_flex")] = 2.9 * up
        tr[:, side_channel(side, "elbow")] = 0.1 * up
        tr[:, side_channel(side, "collar")] = 0.2 * up
    if p["variant"] == "up":
        tr[:, CH["lean"]] = -0.15 * up
        tr[:, CH["neck_pitch"]] = -0.3 * up
    else:  # lean towards p["variant"] ("left" or "right"); positive side_bend leans right
        lean = _keys(t, [0.0, 0.8, 1.4, d - 1.0, d - 0.5, d], [0, 0, 1, 1, 0, 0])
        tr[:, CH["side_bend"]] = -0.45 * _sign(p["variant"]) * lean
    return tr


def _pick_up(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    down = _keys(t, [0.0, 1.1, 1.5, d - 0.4, d], [0, 1, 1, 0, 0])
    tr = _track(t)
    tr[:, CH["lean"]] = 1.25 * down
    tr[:, CH["neck_pitch"]] = 0.2 * down
    for side in ("left", "right"):
        tr[:, side_channel(side, "hip_flex")] = 0.35 * down
        tr[:, side_channel(side, "knee")] = 0.6 * down
        tr[:, side_channel(side, "ankle")] = 0.2 * down
        reach = 0.35 if side == p["side"] else -0.2
        tr[:, side_channel(side, "sh_flex")] = (1.25 + reach) * down
    return tr


def _lunge(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    period = p["duration"] / p["reps"]
    s = _repeat(t, period) / period
    keys = [0.0, 0.4, 0.6, 1.0]
    front, back = p["side"], _other(p["side"])
    tr = _track(t)
    tr[:, side_channel(front, "hip_flex")] = _keys(s, keys, [0, 1.35, 1.35, 0])
    tr[:, side_channel(front, "knee")] = _keys(s, keys, [0, 1.45, 1.45, 0])
    tr[:, side_channel(back, "hip_flex")] = _keys(s, keys, [0, -0.5, -0.5, 0])
    tr[:, side_channel(back, "knee")] = _keys(s, keys, [0, 1.3, 1.3, 0])
    tr[:, side_channel(back, "ankle")] = _keys(s, keys, [0, -0.6, -0.6, 0])
    for side in ("left", "right"):  # hands on the hips
        tr[:, side_channel(side, "sh_abd")] = 0.3
        tr[:, side_channel(side, "elbow")] = 1.7
    tr[:, CH["lean"]] = _keys(s, keys, [0, 0.1, 0.1, 0])
    return _finish(tr, t, ramp=0.3)


def _look_around(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    d = t[-1]  # the last frame: keys ending at d end exactly at rest
    first = _sign(p["side"])
    yaw = _keys(t / d, [0, 0.3, 0.45, 0.75, 0.85, 1.0], [0, 0.9 * first, 0.9 * first, -0.9 * first, -0.9 * first, 0])
    tr = _track(t)
    tr[:, CH["head_yaw"]] = yaw * p["amp"]
    tr[:, CH["twist"]] = 0.2 * yaw
    return tr


def _stand(p: Params) -> np.ndarray:
    t = _times(p["duration"])
    tr = _track(t)
    tr[:, CH["lean"]] = 0.03 * np.sin(2.0 * math.pi * 0.3 * t)
    tr[:, CH["side_bend"]] = 0.02 * np.sin(2.0 * math.pi * 0.2 * t)
    return _finish(tr, t)


# ----------------------------------------------------------------------------- vocabulary

def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(round(rng.uniform(lo, hi), 2))


def _pick(rng: np.random.Generator, options: list[Any] | tuple[Any, ...]) -> Any:
    return options[int(rng.integers(len(options)))]


def _common(rng: np.random.Generator) -> Params:
    return {"amp": _u(rng, 0.85, 1.15), "tempo": _u(rng, 0.9, 1.1)}


def _speed(rng: np.random.Generator) -> str:
    return _pick(rng, ("slow", "normal", "normal", "fast"))


def _lr(rng: np.random.Generator) -> str:
    return _pick(rng, ("left", "right"))


def _reps_duration(rng: np.random.Generator, lo: int, hi: int, period: float) -> Params:
    reps = int(rng.integers(lo, hi + 1))
    return {"reps": reps, "duration": round(reps * period * rng.uniform(0.9, 1.1), 2)}


Sampler = Callable[[np.random.Generator], Params]


@dataclass(frozen=True)
class Action:
    name: str
    build: Callable[[Params], np.ndarray]
    sample: Sampler
    weight: float = 1.0
    locomotion: bool = False  # can carry a gesture ("walks forward while waving")
    gesture: str | None = None  # channels it owns when overlaid: "arms" or "head"


def _walk_like(rng: np.random.Generator, lo: float, hi: float) -> Params:
    speed = _speed(rng)
    seconds = _u(rng, lo, hi) / SPEED_FACTOR[speed] ** 0.5  # slow walks last longer
    return {"speed": speed, "duration": round(seconds, 2), **_common(rng)}


def _sample_side_step(r: np.random.Generator) -> Params:
    return {"side": _lr(r), **_walk_like(r, 1.5, 3.0)}


def _sample_turn(r: np.random.Generator) -> Params:
    angle = _pick(r, (90, 90, 180))
    seconds = _u(r, 1.0, 1.6) if angle == 90 else _u(r, 1.6, 2.4)
    return {"side": _lr(r), "angle": angle, "duration": seconds, **_common(r)}


def _sample_spin(r: np.random.Generator) -> Params:
    reps = _pick(r, (1, 1, 2))
    return {"side": _lr(r), "reps": reps, "duration": round(reps * r.uniform(1.0, 1.4), 2), **_common(r)}


def _sample_squat(r: np.random.Generator) -> Params:
    speed = _speed(r)
    return {"speed": speed, **_reps_duration(r, 1, 3, 2.0 / SPEED_FACTOR[speed]), **_common(r)}


def _sample_wave(r: np.random.Generator) -> Params:
    side = _pick(r, ("left", "right", "left", "right", "both"))
    reps = int(r.integers(2, 6))
    return {"side": side, "reps": reps, "duration": round(1.2 + 0.5 * reps, 2), **_common(r)}


def _sample_clap(r: np.random.Generator) -> Params:
    speed, reps = _speed(r), int(r.integers(3, 8))
    seconds = 1.0 + reps * 0.45 / SPEED_FACTOR[speed]
    return {"speed": speed, "reps": reps, "duration": round(seconds, 2), **_common(r)}


def _side_and(choices: tuple[str, ...], lo: float, hi: float, key: str = "side") -> Sampler:
    return lambda r: {key: _pick(r, choices), "duration": _u(r, lo, hi), **_common(r)}


def _reps(lo: int, hi: int, period: float, **choices: tuple[Any, ...]) -> Sampler:
    return lambda r: {**{k: _pick(r, v) for k, v in choices.items()},
                      **_reps_duration(r, lo, hi, period), **_common(r)}


def _walk_sampler(lo: float, hi: float) -> Sampler:
    return lambda r: _walk_like(r, lo, hi)


_LR = ("left", "right")
ACTIONS: dict[str, Action] = {a.name: a for a in (
    Action("walk_forward", _walk_forward, _walk_sampler(2.0, 4.5), 2.5, locomotion=True),
    Action("walk_backward", _walk_backward, _walk_sampler(2.0, 3.5), locomotion=True),
    Action("run_forward", _run_forward, _walk_sampler(1.5, 3.0), 1.2),
    Action("jog_in_place", _jog_in_place, _walk_sampler(2.0, 3.5)),
    Action("march_in_place", _march_in_place, _walk_sampler(2.0, 3.5), locomotion=True),
    Action("side_step", _side_step, _sample_side_step, locomotion=True),
    Action("turn", _turn, _sample_turn),
    Action("walk_circle", _walk_circle, _side_and(_LR, 5.0, 7.5), 0.8, locomotion=True),
    Action("spin", _spin, _sample_spin),
    Action("jump", _jump, _reps(1, 3, 1.3, direction=("up", "forward")), 1.2),
    Action("hop_one_leg", _hop_one_leg, _reps(2, 5, 0.55, side=_LR)),
    Action("jumping_jacks", _jumping_jacks, _reps(2, 5, 1.1)),
    Action("squat", _squat, _sample_squat),
    Action("sit", _sit, lambda r: {"duration": _u(r, 3.5, 5.5), **_common(r)}),
    Action("bow", _bow, _side_and(("slight", "deep"), 2.0, 3.5, key="variant")),
    Action("kick", _kick, _reps(1, 3, 1.1, side=_LR), 1.2),
    Action("punch", _punch, _reps(2, 4, 0.8, side=("left", "right", "both"))),
    Action("throw", _throw, _side_and(_LR, 1.6, 2.2)),
    Action("wave", _wave, _sample_wave, 1.2, gesture="arms"),
    Action("raise_hand", _raise_hand, _side_and(("left", "right", "both"), 2.0, 3.5), 1.2, gesture="arms"),
    Action("clap", _clap, _sample_clap, gesture="arms"),
    Action("arm_circles", _arm_circles, _side_and(("left", "right", "both", "both"), 2.5, 4.0),
           gesture="arms"),
    Action("stretch", _stretch, _side_and(("up", "up", "left", "right"), 2.8, 4.0, key="variant")),
    Action("pick_up", _pick_up, _side_and(_LR, 2.6, 3.6)),
    Action("lunge", _lunge, _reps(1, 2, 2.2, side=_LR)),
    Action("look_around", _look_around, _side_and(_LR, 2.5, 4.0), 0.8, gesture="head"),
    Action("stand", _stand, lambda r: {"duration": _u(r, 1.0, 2.5), **_common(r)}, 0.3),
)}
ACTION_NAMES = tuple(ACTIONS)
_WEIGHTS = np.array([a.weight for a in ACTIONS.values()]) / sum(a.weight for a in ACTIONS.values())
_UNITS_PER_MOTION = (1, 2, 3, 4)
_UNITS_WEIGHTS = (0.2, 0.35, 0.28, 0.17)
OVERLAY_PROBABILITY = 0.25  # of locomotion units


def _overlay_channels(gesture: Action, params: Params) -> list[int]:
    if gesture.gesture == "head":
        return [CH["head_yaw"], CH["twist"]]
    sides = ("left", "right") if gesture.name == "clap" else _sides(params["side"])
    return [side_channel(s, c) for s in sides for c in ARM_CHANNELS]


def _unit_track(unit: Unit) -> np.ndarray:
    track = ACTIONS[unit.action].build(unit.params)
    if unit.overlay is None:
        return track
    name, params = unit.overlay
    gesture = ACTIONS[name]
    overlay = gesture.build({**params, "duration": unit.params["duration"]})[: len(track)]
    channels = _overlay_channels(gesture, params)
    weight = _envelope(_times(unit.params["duration"]), ramp=0.4)[: len(track), None]
    track[:, channels] = track[:, channels] * (1.0 - weight) + overlay[:, channels] * weight
    return track


def action_weights(scale: dict[str, float] | None = None) -> np.ndarray:
    """Probabilities over ACTION_NAMES: each action's weight times `scale[name]` (default 1)."""
    raw = np.array([a.weight * (scale or {}).get(a.name, 1.0) for a in ACTIONS.values()])
    return raw / raw.sum()


def sample_plan(rng: np.random.Generator, weights: np.ndarray | None = None) -> Plan:
    """1-4 units whose total, with lead-in and tail pauses, lasts MIN_SECONDS..MAX_SECONDS.
    `weights`: probabilities over ACTION_NAMES (default: the actions' own weights)."""
    count = int(rng.choice(_UNITS_PER_MOTION, p=_UNITS_WEIGHTS))
    units: list[Unit] = []
    for _ in range(count):
        name = ACTION_NAMES[int(rng.choice(len(ACTION_NAMES), p=_WEIGHTS if weights is None else weights))]
        params = ACTIONS[name].sample(rng)
        overlay = None
        if ACTIONS[name].locomotion and rng.random() < OVERLAY_PROBABILITY:
            gestures = [a for a in ACTION_NAMES if ACTIONS[a].gesture]
            gesture = _pick(rng, gestures)
            overlay = (gesture, ACTIONS[gesture].sample(rng))
        units.append(Unit(name, params, overlay))
    lead, tail = _u(rng, 0.1, 0.6), _u(rng, 0.1, 0.6)
    while len(units) > 1 and _plan_seconds(units, lead, tail) > MAX_SECONDS:
        units.pop()
    total = _plan_seconds(units, lead, tail)
    if total > MAX_SECONDS:
        lead = tail = 0.1
    elif total < MIN_SECONDS:
        tail = round(tail + MIN_SECONDS - total + 0.05, 2)
    return Plan(units, lead, tail)


def _plan_seconds(units: list[Unit], lead: float, tail: float) -> float:
    body = sum(max(int(round(u.params["duration"] * FPS)), 2) for u in units) / FPS
    return lead + body - UNIT_OVERLAP_S * (len(units) - 1) + tail


def synthesize(plan: Plan) -> np.ndarray:
    """Pose track (T, NUM_CHANNELS) of a plan; T - 1 = the feature frames (<= MAX_SECONDS).

    Units are overlap-added (each fades in and out of the rest pose), then lightly smoothed,
    so no joint jumps between units. `plan.segments` receives each unit's frame range.
    """
    tracks = [_unit_track(u) for u in plan.units]
    overlap = int(round(UNIT_OVERLAP_S * FPS))
    lead, tail = int(round(plan.lead_s * FPS)), int(round(plan.tail_s * FPS))
    frames = lead + sum(len(tr) for tr in tracks) - overlap * (len(tracks) - 1) + tail + 1
    frames = min(frames, int(round(MAX_SECONDS * FPS)) + 1)
    out = np.zeros((frames, NUM_CHANNELS))
    plan.segments = []
    start = lead
    for tr in tracks:
        tr = tr[: max(frames - start, 0)]
        out[start : start + len(tr)] += tr
        plan.segments.append((start, min(start + len(tr), frames - 1)))
        start += len(tr) - overlap
    return gaussian_smooth(out, SMOOTH_SIGMA_FRAMES)
