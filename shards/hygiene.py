"""Split hygiene: leaks between splits that make test numbers optimistic.

Reported, not repaired: the user decides. Only a val split identical to the test split is
refused (by the caller), because then model selection happens on test.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_EXAMPLES = 5


def normalise_caption(text: str) -> str:
    """Case and whitespace do not make two captions different for a retrieval test."""
    return " ".join(text.lower().split())


def _finding(items: list[str]) -> dict[str, Any]:
    items = sorted(items)
    return {"count": len(items), "examples": items[:MAX_EXAMPLES]}


def hygiene_report(ids_by_split: dict[str, list[str]],
                   captions_by_split: dict[str, list[str]],
                   val_equals_test: bool) -> dict[str, Any]:
    """ids_by_split: every id each split names; captions_by_split: usable caption texts."""
    splits_of: dict[str, set[str]] = {}
    for split, ids in ids_by_split.items():
        for motion_id in ids:
            splits_of.setdefault(motion_id, set()).add(split)

    in_several = [f"{i} ({', '.join(sorted(s))})" for i, s in splits_of.items() if len(s) > 1]

    mirror_leaks = []
    for motion_id, splits in splits_of.items():
        if not motion_id.startswith("M") or motion_id[1:] not in splits_of:
            continue
        original = splits_of[motion_id[1:]]
        if splits != original:
            mirror_leaks.append(f"{motion_id} ({', '.join(sorted(splits))}) / "
                                f"{motion_id[1:]} ({', '.join(sorted(original))})")

    train = {normalise_caption(t) for t in captions_by_split.get("train", [])}
    test = {normalise_caption(t) for t in captions_by_split.get("test", [])}
    shared = [f'"{t}"' for t in train & test]

    return {
        "ids_in_several_splits": _finding(in_several),
        "mirror_across_splits": _finding(mirror_leaks),
        "train_test_identical_captions": _finding(shared),
        "val_equals_test": val_equals_test,
    }


def hygiene_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable findings; empty when the splits are clean."""
    labels = {
        "ids_in_several_splits": "ids named by several splits",
        "mirror_across_splits": "ids whose M-mirror lies in another split",
        "train_test_identical_captions": "caption texts in both train and test",
    }
    lines = []
    for key, label in labels.items():
        finding = report.get(key, {})
        if finding.get("count"):
            examples = "; ".join(finding["examples"][:3])
            lines.append(f"{finding['count']} {label}, e.g. {examples}")
    if report.get("val_equals_test"):
        lines.append("the val split is identical to the test split (--allow-val-equals-test)")
    return lines


def print_leaks(locations: list[str], json_path: Path | None, console: Any) -> int:
    """`make_shards.py hygiene DIR ...`: per pair of shard sets (a set with itself too), the train
    motions that duplicate a val/test motion (rehamot.data.leaks); exit 0 whatever is found."""
    from rehamot.data import leaks, schema  # noqa: PLC0415
    from shards.plan import ShardingError  # noqa: PLC0415

    names = [str(location).rstrip("/").rsplit("/", 1)[-1] or str(location) for location in locations]
    if len(set(names)) < len(names):  # two folders of one name: tell them apart by their path
        names = [str(location) for location in locations]
    names = [name if names.count(name) == 1 else f"{name}#{names[:i].count(name) + 1}"  # one folder twice
             for i, name in enumerate(names)]
    try:
        sets = [leaks.load_keys(str(location), schema.load_manifest(str(location)), name)
                for name, location in zip(names, locations)]
    except (ValueError, OSError) as err:  # ShardSetError, LeakKeysError, a missing manifest
        raise ShardingError(str(err)) from None
    report = leaks.find_leaks(sets)
    for keys in sets:
        without = report["sets"][keys.name]["without_content_keys"]
        note = f", {without} without joints (provenance and ids only)" if without else ""
        console.print(f"{keys.name}: {len(keys)} samples ({report['sets'][keys.name]['train']} train, "
                      f"{report['sets'][keys.name]['eval']} val/test){note}", markup=False, highlight=False)
    for line in leaks.report_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    dropped = sum(len(ids) for ids in report["dropped"].values())
    console.print(f"{dropped} train samples duplicate a val/test sample (a run with data.leaks=drop leaves "
                  f"them out); checked in {report['seconds']:.1f} s", markup=False, highlight=False)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0
