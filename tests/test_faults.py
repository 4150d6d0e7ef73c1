"""What a cluster does to rollout workers and learner ranks, done for real to a training run on CPU: the
engine process SIGKILLed, the worker actor SIGKILLed, the engine SIGSTOPped (stuck, not dead). Each
rollout-worker fault is survived (the worker is replaced, gets the current weights, and its prompts are
sampled again) with no step missing; a dead learner rank stops the run, naming it and how to resume."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cluster_utils import SHORT_RUN, own_session

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in out if "reward/total" in r]


def _start(run_dir: Path, *extra: str):
    # The engine in vLLM's own processes (EngineCore), which are what these faults hit.
    cmd = [sys.executable, "-m", "launcher", "train", "configs/tiny_cpu.yaml", f"logging.run_dir={run_dir}",
           f"model.path={run_dir.parent / 'tiny-qwen2-vl'}", *SHORT_RUN, "cluster.cpus_per_actor=0.5",
           "rollout.engine_in_process=false", *extra]
    return own_session(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in _rows(run_dir)):
            return time.monotonic()
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _descendant(proc: subprocess.Popen, marker: str) -> psutil.Process:
    """The one process below the driver whose name or command line holds `marker`."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if marker in p.name() or marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    assert len(found) == 1, f"{len(found)} processes match {marker!r}: {found}"
    return found[0]


@pytest.mark.timeout(1500)
def test_rollout_worker_faults_are_survived(tmp_path):
    run_dir = tmp_path / "run"
    faults = [(2, "EngineCore", signal.SIGKILL), (4, "ray::RolloutWorker", signal.SIGKILL),
              (6, "EngineCore", signal.SIGSTOP)]
    recovery = {}
    with _start(run_dir, "train.steps=8", "rollout.timeout_s=30", "cluster.max_worker_restarts=3") as proc:
        for step, marker, sig in faults:
            _wait_for_step(proc, run_dir, step)
            victim = _descendant(proc, marker)
            victim.send_signal(sig)
            hit = time.monotonic()
            recovery[f"{signal.Signals(sig).name} {marker}"] = _wait_for_step(proc, run_dir, step + 1) - hit
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # no step missing, none twice
    assert sum(r["faults/worker_restarts"] for r in rows) == 3
    # Every batch was sampled with the newest weights: the replaced worker got them before sampling.
    assert [r["rollout_weight_version"] for r in rows] == list(range(0, 8))
    assert [r["weight_version"] for r in rows] == list(range(1, 9))
    assert json.loads((run_dir / "summary.json").read_text())["faults/worker_restarts"] == 3
    assert "replacing rollout worker 0 (3 of at most 3)" in err
    print("recovery time, fault to next step done:", {k: f"{v:.1f} s" for k, v in recovery.items()})


def _kill_after_step(run_dir: Path, step: int, marker: str, *extra: str) -> tuple[subprocess.Popen, str, float]:
    """Start a run, SIGKILL the process matching `marker` once `step` is logged; (process, stderr,
    seconds from the kill to the run's exit)."""
    with _start(run_dir, "train.steps=50", *extra) as proc:
        _wait_for_step(proc, run_dir, step)
        _descendant(proc, marker).kill()
        killed = time.monotonic()
        _, err = proc.communicate(timeout=300)
        return proc, err, time.monotonic() - killed


@pytest.mark.timeout(900)
def test_restart_budget_exhausted_names_the_worker(tmp_path):
    proc, err, _ = _kill_after_step(tmp_path / "run", 1, "EngineCore", "cluster.max_worker_restarts=0")
    assert proc.returncode == 1, err[-3000:]
    assert "rollout worker 0 failed and cluster.max_worker_restarts=0 replacements are used up" in err, err[-3000:]


@pytest.mark.timeout(900)
def test_dead_learner_rank_stops_the_run_with_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    proc, err, took = _kill_after_step(run_dir, 2, "ray::LearnerRank", "train.checkpoint_every=1")
    assert proc.returncode == 1, err[-3000:]
    assert "learner rank 0 died while" in err and "cannot be replaced in place" in err, err[-3000:]
    assert f"logging.run_dir={run_dir}" in err and "resume from" in err
    print(f"dead learner rank: run stopped {took:.1f} s after the kill")
