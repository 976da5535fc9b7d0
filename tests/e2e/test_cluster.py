"""Cluster operations, run here as a 2-node SLURM allocation would run them.

- launchers/slurm.sbatch under stub `srun`/`scontrol` (tests/e2e/stubs): the exact command each
  node runs (a stand-in `accelerate` records it), the USR1/TERM trap, requeue and DONE; the
  spool copy submitted from another directory finds its repository (scontrol's Command=, or
  REHAMOT_HOME), activates its .venv (or REHAMOT_VENV) and passes SRUN_CPUS_PER_TASK on;
- the same script really training two "nodes" on loopback (two `accelerate launch`, machine
  ranks 0/1, static rendezvous, gloo, 1 process each): the global batch spans both nodes; USR1
  mid-epoch -> checkpoint at a step boundary, exit 0, requeue; the requeued job resumes and ends
  bitwise equal to an uninterrupted single-node 2-process run (launchers/local.sh);
- a SIGKILLed node: the surviving one fails within the collective timeout instead of hanging.

Every rendezvous uses a free port. The demo shards' train split holds 251 samples: with
W = 2 ranks x B = 16 an epoch is 7 steps, so a 12-step run crosses one epoch boundary.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import AS_DEMO_RANDOMNESS, REPO, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STUBS = Path(__file__).resolve().parent / "stubs"
FAKE_ACCELERATE = STUBS / "fake_accelerate"
SBATCH = REPO / "launchers" / "slurm.sbatch"
LOCAL = REPO / "launchers" / "local.sh"
VENV_BIN = Path(sys.executable).parent  # `accelerate` and `python` of this environment
CPU_ACCEL = "configs/accelerate/cpu.yaml"
JOB_ID = "4242"
B, W, STEPS, STEPS_PER_EPOCH = 16, 2, 12, 7

# A tiny motion tower and a 1-layer MiniLM keep each launch to seconds. Thresholds of 0.99:
# this tiny model's embeddings are so alike that 0.75 would drop every negative (loss 0).
# Dropout on and a loader worker per rank, as in the demo config: the requeued job must
# resume exactly while both draw random numbers.
RUN = [
    "model.d_model=32", "model.layers=1", "model.heads=2", "model.ff=64", "model.embed_dim=64",
    "model.text_layers=1", *AS_DEMO_RANDOMNESS, f"train.batch_size={B}",
    "train.log_every=1", "train.schedule=constant", "train.eval_batch_size=64", "train.lr_warmup_steps=0",
    "loss.warmup_steps=2", "loss.warmup_epochs=0", "loss.threshold_motion=0.99", "loss.threshold_text=0.99",
    f"train.max_steps={STEPS}", "train.val_every=100",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [key for key in a if not (a[key] == b[key]).all()]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ACCELERATE_CONFIG", None)  # the launchers read it: only a test may set it
    return {**env, **extra}


def slurm_env(tmp: Path, fake_accelerate: bool = False, **extra: str) -> dict[str, str]:
    """The batch shell's environment in a 2-node allocation, stubs first on PATH."""
    logs = tmp / "stub-logs"
    logs.mkdir(exist_ok=True)
    path = [str(STUBS), str(VENV_BIN), os.environ["PATH"]]
    if fake_accelerate:
        path.insert(0, str(FAKE_ACCELERATE))
    env = base_env(
        PATH=os.pathsep.join(path), STUB_LOG_DIR=str(logs), RUN_ROOT=str(tmp / "runs"),
        SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="rehamot", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[001-002]", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="8",
        SLURM_GPUS_ON_NODE="4", SLURM_NTASKS_PER_NODE="1",
        REHAMOT_VENV="",  # the test's environment: activating the repo's .venv would put it before the stubs
    )
    env.pop("OMP_NUM_THREADS")  # the script derives it from the allocation
    env.update(extra)
    return env


def start_sbatch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Its own session: the test can signal the batch shell alone (as SLURM's B: signals do) and
    # clean up the whole job if something fails.
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(SBATCH), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_node(rank: int, port: int, overrides: list[str], log: Path) -> subprocess.Popen:
    """One "node" of a 2-machine launch on loopback: 1 process, machine rank `rank`."""
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", CPU_ACCEL, "--num_machines", "2",
           "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--rdzv_backend", "static",
           "rehamot/train.py", "configs/demo.yaml", *overrides]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"{proc.args} did not finish in {timeout} s\n{log.read_text()[-4000:]}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it, as a dying machine would (torch's agent puts
    each worker in its own session: the launcher's process group alone would miss them)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in train_records(run_dir)):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a launch exited before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged in {timeout} s")


def read_args(logs: Path, node: int) -> list[str]:
    return (logs / f"node{node}.args").read_text().splitlines()


def read_env(logs: Path, node: int) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (logs / f"node{node}.env").read_text().splitlines())


@pytest.fixture(scope="module")
def single_node_run(demo_shards, tmp_path_factory) -> Path:
    """The uninterrupted reference: one node, 2 processes, through launchers/local.sh."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_cli(["bash", str(LOCAL), "2", "configs/demo.yaml", *RUN, f"data.shards={demo_shards}", f"run.dir={run_dir}"],
            env=base_env(MAIN_PROCESS_PORT=str(free_port()), ACCELERATE_CONFIG=CPU_ACCEL))  # CPU even where CUDA is
    assert json.loads((run_dir / "meta.json").read_text())["world_size"] == W
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, STEPS + 1))
    return run_dir


# -- the sbatch script, dry runs -----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["ddp", "zero2", "array"])
def test_sbatch_gives_each_node_its_exact_command(tmp_path, variant):
    extra, args = {}, ["configs/demo.yaml", "train.batch_size=8", "train.decay_steps=[10,20]"]
    config, run_name, overrides = str(REPO / "accelerate_config.yaml"), f"rehamot-{JOB_ID}", args[1:]
    if variant == "zero2":
        extra["ACCELERATE_CONFIG"] = config = str(REPO / "configs/accelerate/zero2.yaml")
    if variant == "array":  # task 1 of array job 4200 takes line 1 of the sweep file
        sweep = tmp_path / "sweep.txt"
        sweep.write_text("loss.name=mh train.lr=1e-4\nloss.name=droptriple train.lr=3e-4\n")
        extra.update(SLURM_ARRAY_JOB_ID="4200", SLURM_ARRAY_TASK_ID="1")
        args, run_name = ["configs/demo.yaml", f"@{sweep}"], "rehamot-4200-1"
        overrides = ["loss.name=droptriple", "train.lr=3e-4"]
    env = slurm_env(tmp_path, fake_accelerate=True, FAKE_ACCELERATE_MODE="done", **extra)
    out = subprocess.run(["bash", str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    logs, run_dir = tmp_path / "stub-logs", tmp_path / "runs" / run_name
    deepspeed = ["--deepspeed_multinode_launcher", "standard"] if variant == "zero2" else []
    for node in (0, 1):
        assert read_args(logs, node) == [
            "launch", "--machine_rank", str(node), "--config_file", config,
            "--num_machines", "2", "--num_processes", "8",  # 2 nodes x SLURM_GPUS_ON_NODE=4
            "--main_process_ip", "node001", "--main_process_port", str(20000 + int(JOB_ID) % 20000),
            "--rdzv_backend", "static", *deepspeed,
            str(REPO / "rehamot/train.py"), "configs/demo.yaml", f"run.dir={run_dir}", "resume=latest", *overrides,
        ]
        assert read_env(logs, node) == {"SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
                                        "SLURM_LOCALID": "0", "OMP_NUM_THREADS": "2"}  # 8 CPUs / 4 procs
    assert (logs / "srun.args").read_text().split() == ["--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert run_dir.is_dir()
    assert "not requeueing" in out.stdout
    assert not (logs / "scontrol.log").exists()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_sbatch_signal_writes_marker_and_requeues(tmp_path, sig):
    env = slurm_env(tmp_path, fake_accelerate=True, FAKE_ACCELERATE_MODE="preempt")
    logs, run_dir = tmp_path / "stub-logs", tmp_path / "runs" / f"rehamot-{JOB_ID}"
    run_dir.mkdir(parents=True)
    (run_dir / "PREEMPT").touch()  # left over from the previous job: must not stop this one
    proc = start_sbatch(["configs/demo.yaml"], env, tmp_path / "job.log")
    deadline = time.monotonic() + 30
    while not all((logs / f"node{n}.started").exists() for n in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()
        time.sleep(0.05)
    assert not (run_dir / "PREEMPT").exists()
    os.kill(proc.pid, sig)  # the batch shell only, as --signal=B:USR1@120 does
    assert finish(proc, tmp_path / "job.log", timeout=30) == 0
    assert (run_dir / "PREEMPT").exists()
    assert (logs / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"
    assert f"requeueing job {JOB_ID}" in (tmp_path / "job.log").read_text()


@pytest.mark.parametrize(("mode", "status"), [("done", 0), ("fail", 1)])
def test_sbatch_requeues_neither_finished_nor_crashed_runs(tmp_path, mode, status):
    env = slurm_env(tmp_path, fake_accelerate=True, FAKE_ACCELERATE_MODE=mode)
    out = subprocess.run(["bash", str(SBATCH), "configs/demo.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == status
    assert not (tmp_path / "stub-logs" / "scontrol.log").exists()
    assert ("DONE" in out.stdout) == (mode == "done")


def fake_repo(tmp: Path) -> Path:
    """A checkout elsewhere: its launchers/slurm.sbatch, rehamot/train.py and a .venv stand-in
    whose activation puts its bin/ first on PATH; there `accelerate` records the node's whole
    environment, then hands over to the dry-run stand-in."""
    repo = tmp / "checkout"
    for path in ("launchers/slurm.sbatch", "accelerate_config.yaml", "rehamot/train.py"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, repo / path)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export VIRTUAL_ENV="{repo / ".venv"}"\nexport PATH="{bin_dir}:$PATH"\n')
    accelerate = bin_dir / "accelerate"
    accelerate.write_text('#!/usr/bin/env bash\nenv > "$STUB_LOG_DIR/node$SLURM_NODEID.fullenv"\n'
                          f'exec "{FAKE_ACCELERATE / "accelerate"}" "$@"\n')
    accelerate.chmod(0o755)
    return repo


def spool_copy(tmp: Path) -> Path:
    """What slurmd runs: a copy of the submitted script in its spool folder."""
    spool = tmp / "spool" / f"job{JOB_ID}"
    spool.mkdir(parents=True)
    return Path(shutil.copy(SBATCH, spool / "slurm_script"))


def scontrol_knowing_the_job(tmp: Path, command: str) -> Path:
    """A stub folder whose `scontrol show job` gives the job's Command= (else the shared stub)."""
    bin_dir = tmp / "scontrol-bin"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text('#!/usr/bin/env bash\nif [[ "$1 $2" == "show job" ]]; then\n'
                    f'  printf "JobId=%s JobName=rehamot\\n   Command={command} configs/demo.yaml\\n" "$3"; exit 0\nfi\n'
                    f'exec "{STUBS / "scontrol"}" "$@"\n')
    stub.chmod(0o755)
    return bin_dir


def node_environment(logs: Path, node: int) -> dict[str, str]:
    lines = (logs / f"node{node}.fullenv").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_sbatch_submitted_from_elsewhere_finds_its_repo_and_activates_its_venv(tmp_path):
    """The spool copy runs from another directory: the repo is the submitted script's
    (`scontrol show job` Command=), its .venv is activated, srun gets the task's CPUs."""
    repo, elsewhere = fake_repo(tmp_path), tmp_path / "home"
    elsewhere.mkdir()
    env = slurm_env(tmp_path, fake_accelerate=True, FAKE_ACCELERATE_MODE="done", SLURM_SUBMIT_DIR=str(elsewhere))
    env.pop("REHAMOT_VENV")
    env["PATH"] = f"{scontrol_knowing_the_job(tmp_path, str(repo / 'launchers' / 'slurm.sbatch'))}:{env['PATH']}"
    out = subprocess.run(["bash", str(spool_copy(tmp_path)), "configs/demo.yaml"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    logs = tmp_path / "stub-logs"
    for node in (0, 1):
        args, node_env = read_args(logs, node), node_environment(logs, node)
        assert str(repo / "rehamot" / "train.py") in args
        assert args[args.index("--config_file") + 1] == str(repo / "accelerate_config.yaml")
        assert node_env["VIRTUAL_ENV"] == str(repo / ".venv")
        assert node_env["SRUN_CPUS_PER_TASK"] == "8" and node_env["REHAMOT_HOME"] == str(repo)


def test_sbatch_takes_rehamot_home_and_refuses_a_repo_it_cannot_find(tmp_path):
    repo, elsewhere = fake_repo(tmp_path), tmp_path / "home"
    elsewhere.mkdir()
    script = spool_copy(tmp_path)  # and the shared scontrol stub knows no job: nothing to go by

    def submit(**extra: str) -> subprocess.CompletedProcess:
        env = slurm_env(tmp_path, fake_accelerate=True, FAKE_ACCELERATE_MODE="done",
                        SLURM_SUBMIT_DIR=str(elsewhere), **extra)
        return subprocess.run(["bash", str(script), "configs/demo.yaml"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=60)

    out = submit()
    assert out.returncode == 2 and out.stderr.strip().startswith("rehamot: "), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "REHAMOT_HOME" in out.stderr
    out = submit(REHAMOT_HOME=str(repo), REHAMOT_VENV=str(repo / ".venv"))
    assert out.returncode == 0, out.stderr
    assert str(repo / "rehamot" / "train.py") in read_args(tmp_path / "stub-logs", 0)
    assert node_environment(tmp_path / "stub-logs", 1)["VIRTUAL_ENV"] == str(repo / ".venv")
    out = submit(REHAMOT_HOME=str(repo), REHAMOT_VENV=str(tmp_path / "no-venv"))
    assert out.returncode == 2 and "REHAMOT_VENV" in out.stderr, out.stderr


# -- shard placement ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["file://", "pipe:curl -sf file://"])
def test_shards_stream_the_same_from_a_url_prefix(demo_shards, prefix):
    """data.shards may be a URL prefix (docs/cluster.md): webdataset opens manifest.json and
    each tar as PREFIX/NAME, e.g. through a `pipe:` command that takes the URL last."""
    if prefix.startswith("pipe:") and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from rehamot.data import DataConfig, TrainStream

    def batches(location: str) -> list[dict]:
        stream = TrainStream(DataConfig(shards=location, batch_size=B, num_workers=0), None, rank=1, world_size=W)
        return list(stream.loader(epoch=1))

    local, remote = batches(str(demo_shards)), batches(prefix + str(demo_shards))
    assert len(remote) == STEPS_PER_EPOCH
    assert [b["ids"] for b in remote] == [b["ids"] for b in local]
    assert all(torch.equal(r["motion"], here["motion"]) for r, here in zip(remote, local))


# -- real runs -------------------------------------------------------------------------------------

def test_sbatch_two_nodes_train_like_one_node_and_resume_exactly_after_usr1(demo_shards, single_node_run, tmp_path):
    """The whole chain on two loopback "nodes" (the script's own `accelerate launch` commands,
    machine ranks 0 and 1, static rendezvous): USR1 to the batch shell -> PREEMPT -> both nodes
    save at a step boundary and exit 0 -> requeue; the requeued job resumes from `latest`.
    Up to the stop the run is step for step the single-node run; after the resume it ends with
    the single-node run's weights, bitwise, and the same per-step losses."""
    logs, run_dir = tmp_path / "stub-logs", tmp_path / "runs" / f"rehamot-{JOB_ID}"
    args = ["configs/demo.yaml", *RUN, f"data.shards={demo_shards}"]
    reference = train_records(single_node_run)

    def job(log: Path) -> None:
        env = slurm_env(tmp_path, PROCS_PER_NODE="1", ACCELERATE_CONFIG=CPU_ACCEL, OMP_NUM_THREADS="1",
                        STUB_HOSTNAMES="localhost localhost", MAIN_PORT=str(free_port()))
        proc = start_sbatch(args, env, log)
        try:
            if log.name == "job1.log":
                wait_for_step(run_dir, 1, [proc])
                os.kill(proc.pid, signal.SIGUSR1)
            assert finish(proc, log) == 0, log.read_text()[-4000:]
        finally:
            kill_tree(proc)

    job(tmp_path / "job1.log")
    assert (logs / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"
    assert (run_dir / "PREEMPT").exists() and not (run_dir / "DONE").exists()
    assert "preemption marker seen" in (tmp_path / "job1.log").read_text()
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    position = json.loads((latest / "position.json").read_text())
    stop = position["step"]
    assert 1 < stop < STEPS and position["world_size"] == W
    assert position["step_in_epoch"] == stop % STEPS_PER_EPOCH != 0, "not mid-epoch: move the signal"
    first = train_records(run_dir)
    assert [r["step"] for r in first] == list(range(1, stop + 1))  # saved right after the last step
    assert [r["loss"] for r in first] == [r["loss"] for r in reference[:stop]]

    job(tmp_path / "job2.log")  # the requeued job: same job id, same run dir
    assert f"resumed from {latest}" in (tmp_path / "job2.log").read_text().replace("\n", "")
    assert (run_dir / "DONE").exists() and not (run_dir / "PREEMPT").exists()
    assert (logs / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # not requeued again
    assert json.loads((run_dir / "meta.json").read_text())["world_size"] == W
    train = train_records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in train] == [r["loss"] for r in reference]
    # The global batch spans both nodes: G = W * B columns, and each of the 2 directions x G
    # anchors has G - 1 candidate negatives (the drop rate's denominator).
    assert {r["global_batch"] for r in train} == {W * B}
    dropping = [r for r in train if r["dropped_negatives"] > 0]
    assert dropping, "no step dropped a negative: the thresholds no longer exercise DropTriple"
    for r in dropping:
        assert r["dropped_negatives"] / r["drop_rate"] == pytest.approx(2 * (W * B) * (W * B - 1))
    assert_same_weights(single_node_run / "final", run_dir / "final")  # bitwise


def test_killed_node_fails_the_other_within_the_timeout(demo_shards, tmp_path):
    timeout_s = 20
    run_dir, port = tmp_path / "dies", free_port()
    overrides = [*RUN, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=1000",
                 f"train.collective_timeout_s={timeout_s}"]
    nodes = [start_node(rank, port, overrides, tmp_path / f"node{rank}.log") for rank in (0, 1)]
    try:
        wait_for_step(run_dir, 1, nodes)
        kill_tree(nodes[1])  # the whole machine goes: launcher and worker, no goodbye
        killed_at = time.monotonic()
        code = finish(nodes[0], tmp_path / "node0.log", timeout=timeout_s + 60)
        waited = time.monotonic() - killed_at
    finally:
        for node in nodes:
            kill_tree(node)
    assert code != 0
    assert waited < timeout_s + 15, f"the surviving node needed {waited:.0f} s to fail"
    assert not (run_dir / "DONE").exists()
    survivor = (tmp_path / "node0.log").read_text()
    assert "rehamot: rank 0: a collective with the other ranks failed" in survivor  # names itself
