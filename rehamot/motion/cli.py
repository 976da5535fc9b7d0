"""Draw a motion file as a stick-figure animation (GIF/MP4) or a key-pose strip (PNG).

    python rehamot/render.py MOTION.npy --out OUT.gif|OUT.mp4|OUT.png [--layout humanml3d|kitml]
                             [--fps N] [--title TEXT] [--poses N]
    python -m rehamot.render MOTION.npy --out OUT.gif ...

MOTION.npy holds HumanML3D/KIT-ML features (T, 263) / (T, 251) or joint positions
(T, 22, 3) / (T, 21, 3). The drawing itself lives in rehamot/motion/stick_figure.py. Like the
other entry points it imports `rehamot` as the installed package (`pip install -e .`).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rehamot.motion.kinematics import LAYOUTS
from rehamot.motion.stick_figure import ANIMATION_SUFFIXES, STRIP_SUFFIXES, load_motion, render_animation, render_keyposes

BAD_INPUT = 2  # argparse's own exit status for a bad command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rehamot-render",
        description="Draw a motion (.npy features or joint positions) as a stick figure: an "
                    "animation that follows the root over a floor grid (.gif, or .mp4 with ffmpeg), "
                    "or a strip of key poses side by side (.png, .pdf, .svg).",
        epilog="examples:\n"
               "  python rehamot/render.py new_joint_vecs/012314.npy --out 012314.gif\n"
               "  python rehamot/render.py new_joints/012314.npy --out 012314.png --poses 8 "
               "--title 'a person walks'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("motion", type=Path, metavar="MOTION.npy",
                        help="features (T, 263|251) or joint positions (T, 22|21, 3)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT",
                        help=f"output file; its suffix picks the kind: "
                             f"{', '.join(ANIMATION_SUFFIXES + STRIP_SUFFIXES)}")
    parser.add_argument("--layout", choices=list(LAYOUTS),
                        help="skeleton layout; default: inferred from the array's shape")
    parser.add_argument("--fps", type=float, default=None,
                        help="animation frame rate; default: the layout's (humanml3d 20, kitml 12.5)")
    parser.add_argument("--title", default=None, help="text drawn above the figure (e.g. the caption)")
    parser.add_argument("--poses", type=int, default=6, help="key poses in a strip (default: 6)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suffix = args.out.suffix.lower()
    try:
        if suffix not in ANIMATION_SUFFIXES + STRIP_SUFFIXES:
            raise ValueError(f"{args.out}: unknown output type {suffix or '(no suffix)'}; use one of "
                             f"{', '.join(ANIMATION_SUFFIXES + STRIP_SUFFIXES)}")
        joints, layout = load_motion(args.motion, args.layout)
        if suffix in ANIMATION_SUFFIXES:
            render_animation(joints, layout, args.out, fps=args.fps, title=args.title)
        else:
            render_keyposes(joints, layout, args.out, poses=args.poses, title=args.title)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"render: {message}", file=sys.stderr)
        return BAD_INPUT
    print(args.out)
    return 0
