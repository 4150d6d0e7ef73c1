"""What a cluster does to rollout workers and learner ranks, done for real to a training run on CPU: the
engine process SIGKILLed, the worker actor SIGKILLed, the engine SIGSTOPped (stuck, not dead). Each
rollout-worker fault is survived (the worker is replaced, gets the current weights, and its prompts are
sampled again) with no step missing; a dead learner rank stops the run, naming it and how to resume."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cluster_utils import SHORT_RUN, descendants, left_over, own_session, ray_session_dir

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


def _signal_after_step(run_dir: Path, step: int, marker: str, sig: signal.Signals,
                       *extra: str) -> tuple[subprocess.Popen, str, float, list[str]]:
    """Start a run, send `sig` to the process matching `marker` once `step` is logged; (process, stderr,
    seconds from the signal to the run's exit, the run's processes still alive after it)."""
    with _start(run_dir, "train.steps=50", *extra) as proc:
        _wait_for_step(proc, run_dir, step)
        procs = descendants(proc.pid)
        session_dir = ray_session_dir(procs)
        _descendant(proc, marker).send_signal(sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=300)
        took = time.monotonic() - sent
    return proc, err, took, left_over(procs, session_dir)


@pytest.mark.timeout(900)
def test_restart_budget_exhausted_names_the_worker(tmp_path):
    proc, err, _, _ = _signal_after_step(tmp_path / "run", 1, "EngineCore", signal.SIGKILL,
                                         "cluster.max_worker_restarts=0")
    assert proc.returncode == 1, err[-3000:]
    assert "rollout worker 0 failed and cluster.max_worker_restarts=0 replacements are used up" in err, err[-3000:]


@pytest.mark.timeout(900)
def test_dead_learner_rank_stops_the_run_with_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    proc, err, took, _ = _signal_after_step(run_dir, 2, "ray::LearnerRank", signal.SIGKILL, "train.checkpoint_every=1")
    assert proc.returncode == 1, err[-3000:]
    assert "learner rank 0 died while" in err and "cannot be replaced in place" in err, err[-3000:]
    assert f"logging.run_dir={run_dir}" in err and "resume from" in err
    print(f"dead learner rank: run stopped {took:.1f} s after the kill")


@pytest.mark.timeout(900)
def test_stuck_learner_rank_is_named_with_its_stack_and_nothing_is_left(tmp_path):
    """A learner rank that stops answering (SIGSTOP: as a rank blocked in a collective or on I/O looks
    from outside) is caught by learner.timeout_s: the run ends with exit 1 and one line naming the rank
    and what it was doing, the rank's Python stacks are in <run>/faults/, and no process is left.

    Where the signal lands decides how long that takes. In training: one deadline. In the weight push, where
    the rank and the rollout workers wait for each other: the push's deadline (learner.timeout_s bounds it
    too), the receivers replaced once, and their re-join, again bounded by learner.timeout_s, names the rank
    (with the fresh workers that waited for it)."""
    run_dir = tmp_path / "run"
    proc, err, took, left = _signal_after_step(run_dir, 3, "ray::LearnerRank", signal.SIGSTOP,
                                               "train.checkpoint_every=2", "learner.timeout_s=60")
    assert proc.returncode == 1, err[-3000:]
    last = [line for line in err.splitlines() if line.startswith("medvlm-r1:")]
    assert len(last) == 1 and re.search(r"learner rank 0(, rollout worker \d+)* did not finish .* within 60 s", last[0]), \
        err[-3000:]
    assert f"logging.run_dir={run_dir}" in last[0] and "resume from" in last[0], last[0]
    stacks = sorted((run_dir / "faults").glob("learner-rank-0-*.txt"))
    assert len(stacks) == 1, f"{list((run_dir / 'faults').iterdir()) if (run_dir / 'faults').exists() else 'no faults/'}"
    text = stacks[0].read_text()
    # Where it was stopped: in a call (training, saving the step-4 checkpoint) or, stopped before the
    # call reached it, in Ray's loop waiting for one; either way the rank's own main thread, read from outside.
    assert re.search(r"^Process \d+: ray::LearnerRank", text, re.M) and '"MainThread"' in text, text[-3000:]
    assert re.search(r"^\s+(LearnerRank\.(train_on|save_state|push_weights) \(learner/actor\.py|Worker\.main_loop "
                     r"\(ray/)", text, re.M), text[-3000:]
    assert took < 240, f"the run took {took:.0f} s to stop after the rank was stopped"
    assert left == []
    print(f"stuck learner rank: run stopped {took:.1f} s after SIGSTOP; {stacks[0].name}:\n{text[:1500]}")


@pytest.mark.timeout(900)
def test_lost_ray_head_ends_the_run_with_our_line_and_nothing_left(tmp_path):
    """The GCS SIGKILLed mid-run (a Ray head or its node lost): the driver ends within about half a
    minute, exit 1, with one line of its own saying so and the resume command; no process is left."""
    run_dir = tmp_path / "run"
    proc, err, took, left = _signal_after_step(run_dir, 2, "gcs_server", signal.SIGKILL, "train.checkpoint_every=1")
    assert proc.returncode == 1, err[-3000:]
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("medvlm-r1: lost the Ray cluster") and "resume from" in last, err[-3000:]
    assert f"logging.run_dir={run_dir}" in last, last
    assert took < 50, f"the run took {took:.0f} s to end after the GCS was killed"
    assert left == []
    print(f"lost Ray head: run ended {took:.1f} s after the GCS was killed")
