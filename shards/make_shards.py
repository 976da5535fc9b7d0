"""Turn a motion-text corpus into WebDataset shards and a manifest.json.

    python shards/make_shards.py humanml3d --root HumanML3D --out data/humanml3d --workers 8
    python shards/make_shards.py kitml --root KIT-ML --out data/kitml [--representation humanml3d]
    python shards/make_shards.py manifest --file corpus.jsonl --out data/mine [--fps 20]
                                          [--root DIR]
    python shards/make_shards.py joints --file corpus.jsonl --out data/mine [--root DIR]
    python shards/make_shards.py demo --motions 2000 --out data/demo
    python shards/make_shards.py index DIR [--out DIR] --fps 20 --layout humanml3d
    python shards/make_shards.py verify data/demo
    python shards/make_shards.py summary data/demo
    python shards/make_shards.py hygiene data/humanml3d data/kitml-h3d [--json FILE]

Output: DIR/<split>-%06d.tar (one sample per motion, sorted by id; a caption with start/end
becomes its own sample `<id>_<caption line>`, cut from its parent motion) and
DIR/manifest.json (counts, sha256 per shard, Mean/Std, what was skipped and why, split
hygiene). The same input gives byte-identical shards whatever --workers is.

Shards are meant to be handed to others, so nothing outside the corpus root is read: every
motion, caption, split and Mean/Std path is resolved (symlinks, '..', absolute paths) and one
that lands outside the root is skipped as `outside_root` and listed in the manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Runs as a plain script from a checkout: import `shards`/`rehamot` from the repository root,
# and keep this folder off sys.path so its module names cannot shadow installed packages.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from rehamot.data import schema  # noqa: E402
from shards.plan import MAX_FPS, MIN_FPS, ShardingError, SourcePlan, is_valid_fps  # noqa: E402
from shards.report import print_summary  # noqa: E402

if TYPE_CHECKING:
    from shards.build import BuildOptions

LAYOUT_DEFAULTS = {  # feature dim, fps, min frames (KIT-ML: 24 as in the T2M loaders)
    "humanml3d": (263, 20.0, 40),
    "kitml": (251, 12.5, 24),
}
# HumanML3D's representation (263 features at 20 fps): what `joints` and
# `kitml --representation humanml3d` write, with HumanML3D's min frames.
SHARED_DIM, _, SHARED_MIN_FRAMES = LAYOUT_DEFAULTS["humanml3d"]


def _build_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, required=True, help="shard folder to create")
    group.add_argument("--workers", type=int, default=1,
                       help="processes that load and encode motions (output is identical "
                            "for any value)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of anything random (the demo corpus); recorded")
    group.add_argument("--shard-mb", type=float, default=16.0,
                       help="start a new shard before one would exceed this many MiB "
                            "(default 16: a 2000-motion demo gives 14 train shards)")
    group.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                       help="motion dtype in the shards")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out atomically")


def _frame_options(parser: argparse.ArgumentParser, min_frames: int, unset: bool = False,
                   note: str = "") -> None:
    """`unset`: the default depends on other options (resolved in _resolve_defaults)."""
    parser.add_argument("--min-frames", type=int, default=None if unset else min_frames,
                        help=f"skip motions and sub-clips shorter than this (default "
                             f"{min_frames}{note})")
    parser.add_argument("--max-frames", type=int, default=196,
                        help="keep the first N frames of longer motions (default 196; "
                             "0: no crop); sub-clips are cut from the parent first")
    parser.add_argument("--allow-val-equals-test", action="store_true",
                        help="shard even if the val split is identical to the test split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rehamot-shards", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, (dim, fps, min_frames) in LAYOUT_DEFAULTS.items():
        sub = commands.add_parser(name, help=f"the {name} folder layout (new_joint_vecs/, "
                                             f"texts/, split files)")
        sub.add_argument("--root", type=Path, required=True, help="the corpus folder")
        sub.add_argument("--split-dir", type=Path, default=None,
                         help="folder of train/val/test.txt (default --root); lines are `id` "
                              "or `id:i,j,k` (only those caption lines)")
        sub.add_argument("--mirrors", choices=("include", "exclude"), default="include",
                         help="keep the mirrored M... ids (default include)")
        sub.add_argument("--feature-dim", type=int, default=None if name == "kitml" else dim,
                         help=f"default {dim}")
        sub.add_argument("--fps", type=float, default=fps,
                         help=f"the corpus's frame rate (default {fps:g})")
        if name == "kitml":
            sub.add_argument("--representation", choices=("native", "humanml3d"),
                             default="native",
                             help="native: new_joint_vecs/ as they are (251 features); "
                                  "humanml3d: new_joints/ turned into HumanML3D's 263 features "
                                  "at 20 fps")
        note = f"; {SHARED_MIN_FRAMES} with --representation humanml3d" if name == "kitml" else ""
        _frame_options(sub, min_frames, unset=name == "kitml", note=note)
        _build_options(sub)

    sub = commands.add_parser("manifest", help="a JSONL corpus of your own")
    sub.add_argument("--file", type=Path, required=True,
                     help='JSONL, one {"id", "motion", "captions", "split", "fps"} per line')
    sub.add_argument("--root", type=Path, default=None,
                     help="the folder every motion must resolve inside (default: the JSONL "
                          "file's folder); `motion` paths stay relative to the file's folder, "
                          "and one outside the root is skipped as outside_root")
    sub.add_argument("--fps", type=float, default=None,
                     help="resample every motion to this rate (required for mixed rates)")
    sub.add_argument("--feature-dim", type=int, default=None,
                     help="expected F (default: the most common F in the corpus)")
    sub.add_argument("--corpus", default=None, help="corpus name (default: the file's stem)")
    _frame_options(sub, 40)
    _build_options(sub)

    sub = commands.add_parser("joints", help="a JSONL corpus of joint positions, sharded as "
                                             "HumanML3D's 263 features at 20 fps")
    sub.add_argument("--file", type=Path, required=True,
                     help='JSONL, one {"id", "joints", "skeleton", "fps", "up", "unit", '
                          '"captions", "split", "source"} per line')
    sub.add_argument("--root", type=Path, default=None,
                     help="the folder every joints file must resolve inside (default: the JSONL "
                          "file's folder)")
    sub.add_argument("--corpus", default=None, help="corpus name (default: the file's stem)")
    _frame_options(sub, SHARED_MIN_FRAMES)
    _build_options(sub)

    sub = commands.add_parser("demo", help="the procedural demo corpus (source in OUT/source/)")
    sub.add_argument("--motions", type=int, default=2000, help="number of motions")
    _frame_options(sub, 40)
    _build_options(sub)

    sub = commands.add_parser("index", help="map WebDataset shards made elsewhere (<key>.npy with "
                                             "<key>.json or <key>.txt captions), or upgrade an older "
                                             "rehamot shard set in place")
    sub.add_argument("dir", type=Path, help="the local folder of .tar shards")
    sub.add_argument("--out", type=Path, default=None,
                     help="where the indexes and manifest.json go (default: DIR; a folder to upload "
                          "beside shards in a bucket)")
    sub.add_argument("--split", choices=schema.SPLITS, default=None,
                     help="every shard's split (default: from its name, train-*, val-*, test-*)")
    sub.add_argument("--fps", type=float, default=None, help="the motions' frame rate")
    sub.add_argument("--layout", choices=tuple(LAYOUT_DEFAULTS), default=None,
                     help="the motions' features: HumanML3D's 263 or KIT-ML's 251")
    sub.add_argument("--feature-dim", type=int, default=None, help="the motions' feature count "
                                                                   "(instead of --layout)")
    sub.add_argument("--corpus", default=None, help="corpus name (default: the folder's name)")

    for name, text in (("verify", "re-read every shard and check it against the manifest"),
                       ("summary", "print the tables of a shard folder")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("dir", help="shard folder or URL prefix")
    sub = commands.add_parser("hygiene", help="train motions that duplicate a val/test motion, within each "
                                              "shard set and across them (from the stored leak keys)")
    sub.add_argument("dirs", nargs="+", help="shard folders or URL prefixes")
    sub.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return parser


def _from_joints(args: argparse.Namespace) -> bool:
    """Whether the command shards joint positions as HumanML3D's features."""
    return args.command == "joints" or getattr(args, "representation", "native") == "humanml3d"


def _resolve_defaults(args: argparse.Namespace) -> None:
    """kitml's defaults depend on the representation written."""
    if args.command != "kitml":
        return
    native_dim, _, native_min_frames = LAYOUT_DEFAULTS["kitml"]
    shared = _from_joints(args)
    if args.min_frames is None:
        args.min_frames = SHARED_MIN_FRAMES if shared else native_min_frames
    if args.feature_dim is None:
        args.feature_dim = SHARED_DIM if shared else native_dim
    if shared and args.feature_dim != SHARED_DIM:
        raise ShardingError(f"--feature-dim {args.feature_dim}: --representation humanml3d "
                            f"writes HumanML3D's {SHARED_DIM} features; leave --feature-dim out")


def _options(args: argparse.Namespace) -> BuildOptions:
    from shards.build import BuildOptions  # noqa: PLC0415

    if args.workers < 1 or args.shard_mb <= 0 or args.min_frames < 1 or args.max_frames < 0:
        raise ShardingError("--workers and --min-frames must be >= 1, --shard-mb > 0, "
                            "--max-frames >= 0")
    fps = getattr(args, "fps", None)
    if fps is not None and not is_valid_fps(fps):
        raise ShardingError(f"--fps {fps:g} is not a frame rate in [{MIN_FPS:g}, {MAX_FPS:g}]")
    return BuildOptions(workers=args.workers, shard_mb=args.shard_mb, min_frames=args.min_frames,
                        max_frames=args.max_frames, dtype=args.dtype)


def _converter(name: str, args: argparse.Namespace, **source: object) -> dict:
    """Only what shapes the output: not --out, --workers or --overwrite."""
    from shards.build import CONVERTER_VERSION  # noqa: PLC0415
    recorded = {"min_frames": args.min_frames, "max_frames": args.max_frames,
                "shard_mb": args.shard_mb, "dtype": args.dtype, "seed": args.seed,
                "allow_val_equals_test": args.allow_val_equals_test, **source}
    return {"name": name, "version": CONVERTER_VERSION, "args": dict(sorted(recorded.items()))}


def _build(args: argparse.Namespace, console: Console) -> int:
    # Imported here, not at the top: webdataset pulls in torch (~2 s), and spawned workers
    # re-run this module's top level.
    from shards.build import staging_dir, write_shards  # noqa: PLC0415

    _resolve_defaults(args)
    options = _options(args)
    with staging_dir(args.out, args.overwrite) as stage:
        if _from_joints(args):
            manifest = _build_from_joints(args, stage, options)
        else:
            plan, converter = _read_source(args, stage, console)
            manifest = write_shards(plan, stage, options, converter, Console(stderr=True))
    print_summary(manifest, args.out, console)
    return 0


def _read_source(args: argparse.Namespace, stage: Path, console: Console
                 ) -> tuple[SourcePlan, dict]:
    """The plan and converter record of a source whose motions are features already."""
    from shards.layout import read_layout  # noqa: PLC0415

    if args.command == "demo":
        plan = _demo_source(args, stage, console)
        return plan, _converter("humanml3d", args, root="source", motions=args.motions,
                                mirrors="include", feature_dim=263, fps=20.0)
    if args.command == "manifest":
        from shards.jsonl_source import read_jsonl  # noqa: PLC0415

        plan = read_jsonl(args.file, root=args.root, corpus=args.corpus, fps=args.fps,
                          feature_dim=args.feature_dim,
                          allow_val_equals_test=args.allow_val_equals_test)
        return plan, _converter("manifest", args, file=str(args.file.resolve()),
                                root=str(args.root.resolve()) if args.root else None,
                                fps=args.fps, feature_dim=plan.feature_dim)
    plan = read_layout(args.root, corpus=args.command, feature_dim=args.feature_dim,
                       fps=args.fps, split_dir=args.split_dir, mirrors=args.mirrors,
                       allow_val_equals_test=args.allow_val_equals_test)
    return plan, _converter(args.command, args, root=str(args.root.resolve()),
                            split_dir=str(args.split_dir.resolve()) if args.split_dir
                            else None, mirrors=args.mirrors,
                            feature_dim=args.feature_dim, fps=args.fps)


def _build_from_joints(args: argparse.Namespace, stage: Path, options: BuildOptions) -> dict:
    """Joint positions (a `joints` JSONL, KIT-ML's new_joints) -> HumanML3D features in a
    scratch folder of the stage (removed before the stage becomes --out) -> the shards."""
    import shutil  # noqa: PLC0415

    from shards.build import write_shards  # noqa: PLC0415
    from shards.joints_source import (  # noqa: PLC0415
        KIT_ML,
        features_from_joints,
        read_joints_jsonl,
        representation,
    )
    from shards.layout import JOINTS_DIR, read_layout  # noqa: PLC0415

    if args.command == "joints":
        plan, specs, provenance = read_joints_jsonl(
            args.file, root=args.root, corpus=args.corpus,
            allow_val_equals_test=args.allow_val_equals_test)
        converter = _converter("joints", args, file=str(args.file.resolve()),
                               root=str(args.root.resolve()) if args.root else None)
    else:
        plan = read_layout(args.root, corpus=args.command, feature_dim=SHARED_DIM, fps=args.fps,
                           split_dir=args.split_dir, mirrors=args.mirrors,
                           allow_val_equals_test=args.allow_val_equals_test,
                           motion_dir=JOINTS_DIR, corpus_stats=False)
        specs = {t.id: KIT_ML for ts in plan.tasks.values() for t in ts}
        provenance = None
        converter = _converter(args.command, args, root=str(args.root.resolve()),
                               split_dir=str(args.split_dir.resolve()) if args.split_dir
                               else None, mirrors=args.mirrors, feature_dim=SHARED_DIM,
                               fps=args.fps, representation=args.representation)
    scratch = stage / ".features-from-joints"
    skeletons = features_from_joints(plan, specs, scratch, args.workers, Console(stderr=True))
    manifest = write_shards(plan, stage, options, converter, Console(stderr=True),
                            representation=representation(skeletons), provenance=provenance)
    shutil.rmtree(scratch)
    return manifest


def _demo_source(args: argparse.Namespace, stage: Path, console: Console) -> SourcePlan:
    from shards.layout import read_layout  # noqa: PLC0415

    try:
        from shards.demo_corpus import write_demo_source  # noqa: PLC0415
    except ImportError as err:
        raise ShardingError(f"the demo corpus generator is not available ({err})") from err
    try:
        stats = write_demo_source(stage / "source", args.motions, seed=args.seed,
                                  workers=args.workers)
    except ValueError as err:  # e.g. too few motions for an 80/10/10 split
        raise ShardingError(f"demo corpus: {err}") from err
    shown = ("motions", "mirrored", "captions", "subclip_captions", "duplicate_caption_rate",
             "seconds")
    console.print(f"demo source: {args.out}/source, "
                  f"{', '.join(f'{k} {stats[k]}' for k in shown if k in stats)}",
                  markup=False, highlight=False, soft_wrap=True)
    return read_layout(stage / "source", corpus="demo", feature_dim=263, fps=20.0,
                       allow_val_equals_test=args.allow_val_equals_test)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    errors = Console(stderr=True)
    try:
        if args.command == "hygiene":
            from shards.hygiene import print_leaks  # noqa: PLC0415

            return print_leaks(args.dirs, args.json, console)
        if args.command in ("verify", "summary"):
            # a clear error if DIR holds no shard set; verify reports bad names one by one
            schema.load_manifest(args.dir, names_checked=args.command != "verify")
        if args.command == "verify":
            from shards.verify import verify_shards  # noqa: PLC0415

            problems = verify_shards(args.dir)
            for problem in problems:
                errors.print(f"[red]FAIL[/] {escape(problem)}", highlight=False, soft_wrap=True)
            if problems:
                errors.print(f"verify: {len(problems)} problem(s) in {args.dir}; rebuild the "
                             f"shards (make_shards.py ... --overwrite)")
                return 1
            manifest = schema.load_manifest(args.dir)
            shards = sum(len(e["shards"]) for e in manifest["splits"].values())
            samples = sum(e["motions"] for e in manifest["splits"].values())
            console.print(f"verify: ok, {shards} shards, {samples} samples in {args.dir}")
            return 0
        if args.command == "summary":
            print_summary(schema.load_manifest(args.dir), args.dir, console)
            return 0
        if args.command == "index":
            from shards.index_shards import index_folder  # noqa: PLC0415

            dim = args.feature_dim or (LAYOUT_DEFAULTS[args.layout][0] if args.layout else None)
            index_folder(args.dir, args.out, split=args.split, fps=args.fps, feature_dim=dim,
                         corpus=args.corpus, console=lambda line: console.print(line, markup=False))
            return 0
        return _build(args, console)
    except ShardingError as err:
        errors.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 1
    except OSError as err:  # disk full, file too large, no manifest
        inspecting = args.command in ("verify", "summary")
        if inspecting and not isinstance(err, FileNotFoundError):
            raise
        tail = "" if inspecting else f"; the build stopped and {args.out} was left as it was"
        errors.print(f"[red]error:[/] {escape(str(err) + tail)}", highlight=False, soft_wrap=True)
        return 1
    except ValueError as err:  # load_manifest's: a foreign format version
        if args.command not in ("verify", "summary"):
            raise
        errors.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
