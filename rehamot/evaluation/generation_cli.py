"""Score generated motions with a trained model as the evaluator (Guo et al.'s protocol).

    rehamot-eval-generation RUN_OR_BUNDLE --generated DIR [--split test] [--repeats 20]
        [--batch-size 32] [--seed 0] [--json OUT|-] [--shards DIR] [--worst N [--worst-dir DIR]]
    python rehamot/evaluate_generation.py ...

DIR holds one `<motion_id>.npy` per motion of the split (raw features in the corpus's layout,
ids as in the split, sub-clip ids included) generated from that motion's captions, and
optionally `DIR/repeats/<motion_id>/<r>.npy`, several generations of one prompt, for
multimodality. The real motions and the captions come from the shards (default: the run's
data.shards). Missing or unreadable files are listed and skipped; motions longer than the
evaluator's window are cropped to their first frames, as real ones are.

Prints a table (rows real / generated: R-precision top-1/2/3, FID, matching score, diversity,
multimodality, each mean ± 95% CI over replications; jitter, foot skating, penetration and
floating on the joints) and writes the JSON to --json OUT (`-`: stdout), with each generated
motion's physical measures under "per_motion". --worst N draws the N worst generated motions
by each physical measure as GIFs into --worst-dir (default: OUT's name with `-worst` beside
it, or RUN_OR_BUNDLE/generation-worst-<split> without a JSON file). When the bundle has no
FID statistics of the split yet, they are computed from the real motions and saved into it,
so that `Evaluator.load(bundle).score(...)` works later without the shards. The library is
`rehamot.evaluation.generation_eval`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.evaluation.generation_metrics import GUO_BATCH_SIZE

REPEATS_DIR = "repeats"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rehamot-eval-generation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run dir (its best/ or final/ bundle) or a bundle folder")
    parser.add_argument("--generated", required=True, help="folder of <motion_id>.npy generated motions")
    parser.add_argument("--split", default="test")
    parser.add_argument("--repeats", type=int, default=20, help="replications (caption draws and orders)")
    parser.add_argument("--batch-size", type=int, default=GUO_BATCH_SIZE, help="R-precision group size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the scores here (- for stdout)")
    parser.add_argument("--shards", default=None, help="shard folder or URL prefix (default: the run's data.shards)")
    parser.add_argument("--worst", type=int, default=0, metavar="N",
                        help="draw the N worst generated motions by each physical measure as GIFs")
    parser.add_argument("--worst-dir", default=None, help="where --worst writes (default: beside the JSON)")
    return parser


def _load_npy(path: Path, check) -> tuple[np.ndarray | None, str | None]:
    """(motion, None) or (None, why it cannot be used). The header is checked against the
    file's size first: np.load would allocate whatever shape it claims."""
    from rehamot.data.schema import check_npy_header

    try:
        with open(path, "rb") as stream:
            check_npy_header(stream, os.fstat(stream.fileno()).st_size)
            stream.seek(0)
            motion = np.load(stream, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        return None, f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    try:
        return check(motion, path.name), None
    except ValueError as err:
        return None, str(err)


def _repeat_number(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (sys.maxsize, path.stem)


def read_generated(folder: Path, ids: Sequence[str], check) -> dict[str, Any]:
    """The generated motions of the split's ids found in `folder`, and what was not usable."""
    found, unreadable, missing = {}, [], []
    for motion_id in ids:
        path = folder / f"{motion_id}.npy"
        if not path.is_file():
            missing.append(motion_id)
            continue
        motion, reason = _load_npy(path, check)
        if motion is None:
            unreadable.append({"file": path.name, "reason": reason})
        else:
            found[motion_id] = motion
    known = set(ids)
    extra = sorted(p.name for p in folder.glob("*.npy") if p.stem not in known)
    repeats: dict[str, list[np.ndarray]] = {}
    repeats_dir = folder / REPEATS_DIR
    if repeats_dir.is_dir():
        for motion_id in ids:
            generations = []
            for path in sorted((repeats_dir / motion_id).glob("*.npy"), key=_repeat_number):
                motion, reason = _load_npy(path, check)
                if motion is None:
                    unreadable.append({"file": f"{REPEATS_DIR}/{motion_id}/{path.name}", "reason": reason})
                else:
                    generations.append(motion)
            if generations:
                repeats[motion_id] = generations
    return {"motions": found, "missing": missing, "unreadable": unreadable, "extra": extra, "repeats": repeats}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rehamot.config import eval_shards, load_config
    from rehamot.data.schema import shared_location
    from rehamot.models.bundle import BUNDLE_FILE, CONFIG_FILE, find_bundle

    folder = Path(args.generated)
    if not folder.is_dir():
        raise NotADirectoryError(f"--generated {folder} is not a folder")
    if not any(folder.glob("*.npy")):  # before loading anything
        raise ValueError(f"no generated motions in {folder}: expected <motion_id>.npy files")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.worst < 0:
        raise ValueError(f"--worst must be a count of motions, got {args.worst}")
    bundle = find_bundle(args.run_dir)
    cfg = load_config(bundle / CONFIG_FILE)
    feature_dim = int(json.loads((bundle / BUNDLE_FILE).read_text())["feature_dim"])
    # the bundle's config may come from anyone: its location must run nothing
    shards = args.shards or shared_location(eval_shards(cfg.data), str(bundle / CONFIG_FILE))  # a mixture: its eval source

    from rehamot.evaluation.generation_eval import Evaluator, check_motion, read_split

    start = time.perf_counter()
    ids, captions, real = read_split(shards, args.split)
    generated = read_generated(folder, ids, lambda motion, what: check_motion(motion, feature_dim, what))
    usable = [i for i in ids if i in generated["motions"]]
    if not usable:
        raise ValueError(f"no usable generated motions in {folder}: none of the {len(ids)} {args.split} ids has a "
                         f"readable <id>.npy ({len(generated['missing'])} missing, "
                         f"{len(generated['unreadable'])} unreadable)")
    if len(usable) < args.batch_size:  # before the model is loaded
        raise ValueError(f"{len(usable)} motions is fewer than one R-precision batch of {args.batch_size} "
                         f"({len(generated['missing'])} of the {len(ids)} {args.split} ids have no file, "
                         f"{len(generated['unreadable'])} files are unusable)")
    evaluator = Evaluator.load(bundle)
    notes = []
    if evaluator.fid_stats(args.split) is None:
        path = evaluator.save_fid_stats([real[i] for i in ids], args.split)
        notes.append(f"saved the real {args.split} motions' FID statistics into the bundle ({path.name})")
    repeat_ids = [i for i in ids if len(generated["repeats"].get(i, ())) >= 2]
    result = evaluator.score(
        [captions[i] for i in usable], [generated["motions"][i] for i in usable], [real[i] for i in usable],
        repeats=args.repeats, batch_size=args.batch_size, seed=args.seed, split=args.split,
        generated_repeats=[generated["repeats"][i] for i in repeat_ids] or None, ids=usable)
    if generated["missing"]:
        notes.append(f"{len(generated['missing'])} of the {len(ids)} {args.split} motions have no generated file "
                     f"(e.g. {', '.join(generated['missing'][:3])}); both rows use the other {len(usable)}")
    if generated["unreadable"]:
        notes.append(f"{len(generated['unreadable'])} files skipped as unusable (listed under 'unreadable')")
    if generated["extra"]:
        notes.append(f"{len(generated['extra'])} .npy files name no {args.split} motion and were ignored")
    result["notes"] = notes + result["notes"]
    result.update({
        "generated_dir": str(folder), "shards": str(shards), "split_motions": len(ids),
        "missing_ids": generated["missing"], "unreadable": generated["unreadable"], "extra_files": generated["extra"],
        "multimodality_ids": repeat_ids, "seconds": round(time.perf_counter() - start, 2),
    })
    if args.worst:  # after the timing: drawing is not evaluating
        result["worst"] = draw_worst(result["per_motion"], generated["motions"], evaluator.layout, worst_dir(args),
                                     args.worst)
    return result


def worst_dir(args: argparse.Namespace) -> Path:
    """--worst-dir, else OUT's name with `-worst` beside the JSON, else under the run dir."""
    if args.worst_dir:
        return Path(args.worst_dir)
    if args.json and args.json != "-":
        out = Path(args.json)
        return out.with_name(f"{out.stem}-worst")
    return Path(args.run_dir) / f"generation-worst-{args.split}"


def worst_ids(per_motion: dict[str, dict[str, Any]], measure: str, count: int) -> list[str]:
    """The `count` ids with the highest value of `measure` (ties by id), those without one left out."""
    scored = [(values[measure], motion_id) for motion_id, values in per_motion.items() if values[measure] is not None]
    return [motion_id for _, motion_id in sorted(scored, key=lambda item: (-item[0], item[1]))[:count]]


def draw_worst(per_motion: dict[str, dict[str, Any]], motions: dict[str, np.ndarray], layout: str, folder: Path,
               count: int) -> dict[str, list[dict[str, Any]]]:
    """FOLDER/<measure>/<rank>-<id>.gif for the `count` worst generated motions by each measure."""
    from rehamot.motion.kinematics import features_to_joints
    from rehamot.motion.physics import MEASURES, UNITS
    from rehamot.motion.stick_figure import render_animation

    drawn: dict[str, list[dict[str, Any]]] = {}
    for measure in MEASURES:
        drawn[measure] = []
        for rank, motion_id in enumerate(worst_ids(per_motion, measure, count), start=1):
            value = per_motion[motion_id][measure]
            path = folder / measure / f"{rank}-{motion_id}.gif"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_animation(features_to_joints(motions[motion_id], layout), layout, path,
                             title=f"{motion_id}: {measure} {value:.3g} {UNITS[measure]}")
            drawn[measure].append({"motion_id": motion_id, "value": value, "file": str(path)})
    return drawn


def report(result: dict[str, Any], json_out: str | None) -> None:
    from rich.console import Console

    from rehamot.evaluation.generation_eval import format_scores

    counts = result["counts"]
    console = Console(stderr=json_out == "-")  # stdout is the JSON's then
    title = (f"{result['split']} split: {counts['motions']} prompts, {counts['repeats']} replications, "
             f"groups of {counts['batch_size']} (bundle step {result['bundle'].get('step')})")
    table = format_scores(result, title)
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    if natural > console.width:  # never truncate numbers in a log file or a narrow terminal
        console = Console(file=console.file, width=natural)
    console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
    for item in result["unreadable"][:10]:
        console.print(f"skipped {item['file']}: {item['reason']}", highlight=False)
    for measure, drawn in result.get("worst", {}).items():
        if drawn:
            console.print(f"worst by {measure}: " + ", ".join(d["motion_id"] for d in drawn)
                          + f" (GIFs in {Path(drawn[0]['file']).parent})", highlight=False)
    text = json.dumps(result, indent=1)
    if json_out == "-":
        print(text)
    elif json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")
        console.print(f"wrote {json_out}", highlight=False)
    console.print(f"evaluation time: {result['seconds']:.1f} s", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report(run(args), args.json)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        # a user's mistake (no bundle, no files, too few motions): one line, not a traceback
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"evaluate_generation: {message}", file=sys.stderr)
        return 2
    return 0
