"""data.leaks at the start of a run: the train samples that duplicate a val/test sample of any
source (rehamot.data.leaks), left out of training and listed in RUN_DIR/leaks.json.

A resumed run reuses its leaks.json instead of checking again, and refuses to start if what
the report depends on (the action, the splits, each source's keys) changed: the samples left
out, and with them the data order, would silently differ from the checkpoint's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rehamot.config import Config, data_sources, eval_shards
from rehamot.data import leaks, schema
from rehamot.training.run_dir import RunRefused


class LeakCheck:
    """The run's leak report (main process): computed, or read back on a resume."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.path = cfg, Path(run_dir) / leaks.LEAKS_FILE
        if cfg.data.sources:
            self.sources = [(s.name, s.shards) for s in data_sources(cfg.data)]
        else:
            self.sources = [(eval_shards(cfg.data).rstrip("/").rsplit("/", 1)[-1], eval_shards(cfg.data))]
        self.action = leaks.resolve_action(cfg.data.leaks, len(self.sources))
        self.report: dict[str, Any] | None = None
        self.reused, self.skipped = False, []

    def run(self) -> dict[str, list[str]] | None:
        """The {source: sample ids} to drop (None: none), printing what was found."""
        resumed_report = bool(self.cfg.resume) and self.path.exists()
        if self.action == "off" and not resumed_report:
            return None
        data = self.cfg.data
        eval_splits = [data.val_split, data.test_split]
        manifests = [(name, location, schema.load_manifest(location)) for name, location in self.sources]
        inputs = leaks.run_inputs([(n, m) for n, _, m in manifests], self.action, data.train_split, eval_splits)
        if resumed_report:
            self.report = self._reuse(inputs)  # never written with data.leaks=off: off refuses here
        else:
            if self.cfg.resume and (self.path.parent / "checkpoints").exists():
                print(f"leaks: no {self.path.name} in {self.path.parent} (a run from before the check): "
                      "checking now; the samples left out may differ from the run's start", flush=True)
            try:
                report, self.skipped = leaks.check_sources(
                    manifests, train_split=data.train_split, eval_splits=eval_splits,
                    require_keys=data.leaks != "auto")
            except leaks.LeakKeysError as err:
                raise RunRefused(f"{err} (or data.leaks=off)") from None
            self.report = {"inputs": inputs, "skipped_without_keys": self.skipped, **report}
        self._say()
        return self.report["dropped"] if self.action == "drop" else None

    def _reuse(self, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            report = json.loads(self.path.read_text(encoding="utf-8"))
            dropped = report["dropped"]
            if not isinstance(dropped, dict):
                raise ValueError("no dropped samples listed")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunRefused(f"{self.path}: unreadable ({str(err)[:120]}); it lists the samples this run "
                             "left out: restore it, or start over") from None
        if report.get("inputs") != inputs:
            raise RunRefused(f"{self.path} was made with other leak settings or keys ({_changed(report.get('inputs'), inputs)}); "
                             "resuming would change the samples left out: resume with the same data.leaks, splits and "
                             "shards, or start over")
        self.reused = True
        return report

    def _say(self) -> None:
        report = self.report
        where = f"{self.path} (reused)" if self.reused else str(self.path)
        for name in report.get("skipped_without_keys", []):
            print(f"leaks: source {name!r} lists no leak keys: not checked; re-shard it, or "
                  "remove its manifest.json and run make_shards.py index on it, to check it", flush=True)
        dropped = sum(len(ids) for ids in report["dropped"].values())
        verb = "left out of training" if self.action == "drop" else "found (data.leaks=report: kept)"
        print(f"leaks: {dropped} train samples duplicate a val/test sample, {verb}; {where}", flush=True)
        for line in leaks.report_lines(report):
            if not line.endswith(": 0 duplicate(s)"):
                print(f"  {line}", flush=True)

    def write(self) -> None:
        """RUN_DIR/leaks.json, once the run dir is known to be this run's (not when reused)."""
        if self.report is None or self.reused:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.report, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)


def _changed(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = [k for k in new if old.get(k) != new[k] and k != "keys"]
    sources = [n for n in set(new["keys"]) | set(old.get("keys") or {})
               if (old.get("keys") or {}).get(n) != new["keys"].get(n)]
    return ", ".join([*keys, *(f"source {n!r}" for n in sorted(sources))]) or "unknown"
