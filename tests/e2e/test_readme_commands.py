"""The README's commands still run, at small scale: every `python ...` line of its bash blocks
that needs no GPU, SLURM, licensed corpus or hub model (sharding checks, training, evaluation,
search, rendering, scoring generated motions) is run as written, with its example paths
pointed at a tiny run on the session's demo shards. A renamed flag or script fails here."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
NEEDS_MORE = re.compile(r"humanml3d\.yaml|kitml\.yaml|make_shards\.py (humanml3d|kitml|manifest)|search\.py serve|\$")
RUN_NAME = re.compile(r"runs/demo-\d{8}-\d{6}|RUN_DIR")


def readme_commands() -> list[str]:
    """`python ...` lines of the README's bash blocks, continuations joined, comments cut."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("python ") and not NEEDS_MORE.search(line):
                commands.append(line)
    return commands


def test_the_readme_has_the_commands_this_check_expects():
    scripts = {shlex.split(c)[1] for c in readme_commands()}
    assert {"rehamot/train.py", "rehamot/evaluate.py", "rehamot/search.py", "rehamot/render.py",
            "shards/make_shards.py", "rehamot/evaluate_generation.py"} <= scripts


def _raw_motion(shards: Path, out: Path) -> str:
    """One motion's raw features, as a user's file would hold them (from a test shard)."""
    tar = sorted(shards.glob("test-*.tar"))[0]
    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".motion.npy"))
        out.write_bytes(archive.extractfile(member).read())
    return member.name.split(".", 1)[0]


def test_readme_commands_run(demo_shards, tmp_path):
    run_dir = tmp_path / "run"  # made by the README's training command, used by the others
    motion_id = _raw_motion(demo_shards, tmp_path / "motion.npy")
    substitutions = [
        (RUN_NAME, str(run_dir)),
        (re.compile(r"data/(demo|humanml3d|kitml|mine|wds)\b"), str(demo_shards)),
        (re.compile(r"\bMOTION\.npy\b"), str(tmp_path / "motion.npy")),
        (re.compile(r"\bOUT\.(gif|png|mp4)\b"), str(tmp_path / r"out.\1")),
        (re.compile(r"--motion 0\d+"), f"--motion {motion_id}"),
        (re.compile(r"outputs/"), f"{tmp_path}/outputs/"),
        (re.compile(r"--generated DIR"), f"--generated {tmp_path}/outputs/gen-examples/real"),
        (re.compile(r"scores\.json"), str(tmp_path / "scores.json")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    order = ["make_shards.py", "train.py", "evaluate.py", "search.py index", "search.py query", "render.py",
             "generation_examples.py", "evaluate_generation.py", "search_latency.py"]
    commands = sorted(readme_commands(), key=lambda c: next((i for i, k in enumerate(order) if k in c), len(order)))
    ran = []
    for command in commands:
        for pattern, value in substitutions:
            command = pattern.sub(value, command)
        if "rehamot/train.py" in command:
            command += " " + " ".join([*TINY_RUN, f"data.shards={demo_shards}", f"run.dir={run_dir}",
                                       "train.max_steps=3"])
        if "evaluate_generation.py" in command:
            command += " --batch-size 8 --repeats 3"  # the tiny test split has fewer than 32 motions
        if "search_latency.py" in command:
            command += " --motions 2000"
        if "render.py" in command and ".mp4" in command:
            continue  # needs ffmpeg
        out = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 10, ran
