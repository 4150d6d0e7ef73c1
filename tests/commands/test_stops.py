"""Clean stops of `medvlm-r1 train`: SIGTERM (kill, Slurm) and Ctrl-C (SIGINT to the terminal's process group)
end a running training with exit 143 / 130 and one line naming the signal, a metrics.jsonl that parses line by
line, and no Ray or vLLM process left: every process the driver had started is gone once it returns.

The signal and exit-code logic itself is covered without processes in test_user_errors.py.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_utils import REPO_ROOT, SHORT_RUN, descendants, left_over, own_session, ray_session_dir

pytestmark = pytest.mark.slow


def _step_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "reward/total" in r]


def _train(run_dir: Path, model_dir: str, *extra: str):
    """`medvlm-r1 train` in its own process group, like a command in a terminal."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "launcher", "train", "configs/tiny_cpu.yaml", *SHORT_RUN,
           f"model.path={model_dir}", f"logging.run_dir={run_dir}", *extra]
    return own_session(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_step(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 900
    while not _step_rows(run_dir / "metrics.jsonl"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no step row (exit {proc.returncode}):\n{err[-4000:]}")
        time.sleep(1)


# vLLM's engine core in a process of its own (VLLM::EngineCore) and inside the rollout worker, as the demo runs it.
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("signame, to_group, code, in_process", [("SIGTERM", False, 143, False),
                                                                 ("SIGINT", True, 130, True)])
def test_signal_stops_training_cleanly(tmp_path, tiny_model_dir, signame, to_group, code, in_process):
    run_dir = tmp_path / "run"
    with _train(run_dir, tiny_model_dir, "train.steps=200", f"rollout.engine_in_process={in_process}") as proc:
        _wait_for_a_step(proc, run_dir)
        procs = descendants(proc.pid)
        names = {p.name() for p in procs}
        assert {"raylet", "gcs_server"} <= names and any(n.startswith("ray::RolloutWorker") for n in names), names
        assert any(n.startswith("VLLM::") for n in names) != in_process, names
        session_dir = ray_session_dir(procs)
        sent = time.monotonic()
        if to_group:
            os.killpg(proc.pid, getattr(signal, signame))  # Ctrl-C: the terminal signals the whole group
        else:
            proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=600)
    print(f"{signame}: exit {proc.returncode} {time.monotonic() - sent:.1f} s after the signal")
    assert proc.returncode == code, err[-4000:]
    ours = [line for line in err.splitlines() if line.startswith("medvlm-r1:")]
    assert len(ours) == 1 and re.fullmatch(
        rf"medvlm-r1: stopped by {signame}; (last checkpoint: \S+|no checkpoint saved)", ours[0]), err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert 1 <= len(_step_rows(run_dir / "metrics.jsonl")) < 200
    assert left_over(procs, session_dir) == []


@pytest.mark.timeout(900)
def test_signal_during_start_up_stops_at_once(tmp_path, tiny_model_dir):
    """Start-up has nothing to save: SIGTERM during the format warm-up ends the command at once (Slurm's
    scancel allows 30 s before SIGKILL), with its one line and no process left."""
    run_dir = tmp_path / "run"
    with _train(run_dir, tiny_model_dir, "train.format_warmup_steps=100000") as proc:
        deadline = time.monotonic() + 600
        while not any(p.name().startswith("ray::warmup_format") for p in descendants(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no format warm-up task started"
            time.sleep(0.5)
        procs = descendants(proc.pid)
        session_dir = ray_session_dir(procs)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    print(f"SIGTERM during the warm-up: exit {proc.returncode} {took:.1f} s after the signal")
    assert proc.returncode == 143, err[-4000:]
    assert [line for line in err.splitlines() if line.startswith("medvlm-r1:")] == [
        "medvlm-r1: stopped at once by SIGTERM"], err[-4000:]
    assert took < 30, took  # within Slurm's default KillWait
    assert not _step_rows(run_dir / "metrics.jsonl")
    assert left_over(procs, session_dir) == []
