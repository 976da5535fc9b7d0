"""Shards in object storage: every command reads them from real servers started here on
127.0.0.1 (Debian's nginx for http://, moto's server for s3://), with the batches of the local
folder, through a server restart in the middle of an epoch."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import AS_DEMO_RANDOMNESS, REPO, TINY_RUN, run_cli

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
RUN = [*TINY_RUN, *AS_DEMO_RANDOMNESS, "train.max_steps=4", "train.val_every=4", "train.save_every=2"]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Nginx:
    """nginx serving `root` on 127.0.0.1:port, in the foreground (no master: one process to stop)."""

    def __init__(self, root: Path, work: Path) -> None:
        self.port, self.work, self.proc = free_port(), work, None
        work.mkdir(parents=True, exist_ok=True)
        temp = "".join(f"{name}_temp_path {work / name};\n" for name in
                       ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (work / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
            f"error_log {work / 'error.log'};\nevents {{ worker_connections 64; }}\n"
            f"http {{\n access_log off;\n{temp} server {{\n  listen 127.0.0.1:{self.port};\n"
            f"  root {root};\n }}\n}}\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([NGINX, "-p", str(self.work), "-c", str(self.work / "nginx.conf")],
                                     stderr=subprocess.PIPE, text=True)
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def nginx(demo_shards, tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian package nginx-light; `make setup` and .ci/run install it)")
    server = Nginx(demo_shards.parent, tmp_path_factory.mktemp("nginx"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_shards(demo_shards, tmp_path_factory):
    """The demo shard set uploaded to a bucket of moto's S3 server: (s3:// location, env)."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        client = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                       region_name="us-east-1").client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="motions")
        for path in demo_shards.iterdir():
            if path.is_file():
                client.upload_file(str(path), "motions", f"demo/shards/{path.name}")
        yield "s3://motions/demo/shards", env
    finally:
        proc.kill()
        proc.wait(timeout=10)


def train(shards: str, run_dir: Path, *extra: str, env: dict[str, str] | None = None, check: bool = True):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *RUN, f"data.shards={shards}",
                    f"run.dir={run_dir}", *extra], env=env, check=check)


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_results(run_dir: Path, split: str = "test") -> dict:
    return json.loads((run_dir / f"eval-{split}.json").read_text())["protocols"]


test_results.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def local_run(demo_shards, tmp_path_factory) -> Path:
    """4 steps from the local folder, dropout on and a loader worker, evaluated: the reference."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    train(str(demo_shards), run_dir)
    run_cli([sys.executable, "rehamot/evaluate.py", str(run_dir), "--no-figures"])
    return run_dir


def train_resume_evaluate(shards: str, run_dir: Path, env: dict[str, str] | None = None) -> None:
    """2 steps, resumed to 4, evaluated and indexed, all from `shards`."""
    train(shards, run_dir, "train.max_steps=2", env=env)
    out = train(shards, run_dir, "resume=latest", env=env)
    assert "resumed from" in out.stdout
    run_cli([sys.executable, "rehamot/evaluate.py", str(run_dir), "--shards", shards, "--no-figures"], env=env)
    out = run_cli([sys.executable, "rehamot/search.py", "index", str(run_dir), "--shards", shards], env=env)
    assert "31 motions" in out.stdout


def test_http_train_resume_evaluate_index_match_the_local_folder(nginx, local_run, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    train_resume_evaluate(f"{nginx.url}/{demo_shards.name}/", run_dir)
    assert losses(run_dir) == losses(local_run) and list(losses(local_run)) == [1, 2, 3, 4]
    assert test_results(run_dir) == test_results(local_run)


def test_s3_train_resume_evaluate_index_match_the_local_folder(s3_shards, local_run, tmp_path):
    shards, env = s3_shards
    run_dir = tmp_path / "run"
    train_resume_evaluate(shards, run_dir, env=env)
    assert losses(run_dir) == losses(local_run) and list(losses(local_run)) == [1, 2, 3, 4]
    assert test_results(run_dir) == test_results(local_run)


def test_a_server_restarting_mid_epoch_changes_no_batch(nginx, local_run, demo_shards, tmp_path):
    """nginx is stopped after the first step, while the loader worker reads ahead, and started
    again once a read has failed and is being retried: the read resumes at the byte it stopped
    at, and every loss is the local folder's."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "rehamot/train.py", "configs/demo.yaml", *RUN, f"data.shards={nginx.url}/shards",
               f"run.dir={run_dir}", "train.max_steps=6", "train.val_every=100"]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = []
    try:
        while not (run_dir / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.02)
        nginx.stop()
        for line in proc.stderr:  # the run waits and retries while the server is down
            stderr.append(line)
            if "retry 1 of" in line:
                break
        nginx.start()
        stderr += proc.stderr.readlines()
        assert proc.wait(timeout=120) == 0, "".join(stderr)[-3000:]
    finally:
        proc.kill()
        if nginx.proc.poll() is not None:  # the fixture's server serves the tests after this one
            nginx.start()
    assert any("retry 1 of" in line for line in stderr), "".join(stderr)[-3000:]
    reference = losses(local_run)
    assert {step: loss for step, loss in losses(run_dir).items() if step in reference} == reference


def test_the_generation_evaluator_reads_a_url(nginx, local_run, demo_shards, tmp_path):
    """The split's real motions scored as generated ones, against the folder and the URL."""
    from rehamot.data.reading import read_raw_motions

    folder = tmp_path / "generated"
    folder.mkdir()
    for motion_id, motion in read_raw_motions(str(demo_shards), "test").items():
        np.save(folder / f"{motion_id}.npy", motion, allow_pickle=False)
    scores = {}
    for name, shards in (("folder", str(demo_shards)), ("url", f"{nginx.url}/shards")):
        out = tmp_path / f"{name}.json"
        run_cli([sys.executable, "rehamot/evaluate_generation.py", str(local_run), "--generated", str(folder),
                 "--shards", shards, "--batch-size", "8", "--json", str(out)])
        scores[name] = {k: v for k, v in json.loads(out.read_text()).items() if k not in ("shards", "seconds")}
    assert scores["url"] == scores["folder"] and scores["folder"]


def test_verify_and_summary_read_a_url(nginx, s3_shards, demo_shards):
    for shards, env in ((f"{nginx.url}/{demo_shards.name}", None), s3_shards):
        out = run_cli([sys.executable, "shards/make_shards.py", "verify", shards], env=env)
        assert "verify: ok" in out.stdout
        out = run_cli([sys.executable, "shards/make_shards.py", "summary", shards], env=env)
        assert "train" in out.stdout


def test_a_missing_shard_at_a_url_is_one_line_at_start_up(nginx, demo_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards, ignore=shutil.ignore_patterns("source"))
    (shards / "train-000003.index.json").unlink()
    served = Nginx(tmp_path, tmp_path / "nginx")
    served.start()
    try:
        out = train(f"{served.url}/shards", tmp_path / "run", check=False)
        missing = run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *RUN,
                           f"data.shards={served.url}/nowhere", f"run.dir={tmp_path / 'run2'}"], check=False)
    finally:
        served.stop()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-000003.index.json is named in manifest.json but missing" in lines[0]
    assert missing.returncode == 2 and "no manifest.json at" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoints/*"))
