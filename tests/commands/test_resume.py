"""Full checkpoints and resume, end to end on CPU: a run stopped after its checkpoint at step k and resumed
gives steps k+1..n exactly as an uninterrupted run with the same seed, for 1 and 2 learner ranks, ZeRO-2
and ZeRO-3 (the 2-rank run resumes past a damaged newest checkpoint); every step stays once in
metrics.jsonl; changed state keys are refused; a used run dir is never silently reused. The manifest's
own unit tests are in test_checkpoint_manifest.py."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import checkpoints
from launcher.config import ConfigError, load_config
from cluster_utils import REPO_ROOT, own_session
from resume_checks import assert_same_steps, latest_step, run_overrides, step_rows


def _damage_newest(src: Path, dst: Path) -> Path:
    """`dst` as `src` was when its run was killed right after its newest checkpoint, with that checkpoint's
    largest file then cut short (the disk or a copy failed); returns that file."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    (dst / "summary.json").unlink()
    newest = checkpoints.latest(dst)
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ranks,stage", [(2, 3)])  # 1 rank ZeRO-2: the SIGKILL test below
def test_resume_continues_exactly(warmed_model, tmp_path, ranks, stage, caplog):
    """Killed after its step-4 checkpoint, whose largest file was then cut short: the same command again
    (train.resume=auto) says step 4 is damaged, resumes from step 2 and gives steps 3-4 exactly."""
    from launcher.train_loop import run_training

    extra = (f"learner.num_ranks={ranks}", f"learner.zero_stage={stage}")
    ref_dir = tmp_path / "uninterrupted"
    reference = run_training(load_config("configs/tiny_cpu.yaml", run_overrides(warmed_model, ref_dir, *extra)))
    assert sorted(p.name for p in (ref_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert reference.summary["last_checkpoint"].endswith("step-000004")

    resumed_dir = tmp_path / "resumed"
    victim = _damage_newest(ref_dir, resumed_dir)
    size = (ref_dir / victim.relative_to(resumed_dir)).stat().st_size
    with caplog.at_level(logging.INFO, logger="launcher"):
        resumed = run_training(load_config("configs/tiny_cpu.yaml", run_overrides(warmed_model, resumed_dir, *extra)))
    damaged, intact = resumed_dir / "checkpoints/step-000004", resumed_dir / "checkpoints/step-000002"
    assert (f"checkpoint {damaged} is damaged: {victim.relative_to(damaged).as_posix()}: expected {size} bytes, "
            f"found {size // 2} bytes") in caplog.text
    assert f"resuming from {intact}, the newest intact checkpoint, instead of the damaged step-000004" in caplog.text
    assert f"resuming from {intact} (step 2)" in caplog.text
    assert resumed.summary["last_checkpoint"] == str(damaged) and checkpoints.damage(damaged) == []  # rewritten
    assert_same_steps(step_rows(resumed_dir), step_rows(ref_dir), after=2)
    from safetensors.torch import load_file

    a, b = load_file(str(ref_dir / "final/model.safetensors")), load_file(str(resumed_dir / "final/model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sigkilled_run_resumes_exactly_with_one_rank(warmed_model, tmp_path):
    """The real thing: SIGKILL the whole driver (Ray and vLLM with it) once its step-2 checkpoint is
    written, then run the same command again."""
    cmd = [sys.executable, "-m", "launcher", "train", "configs/tiny_cpu.yaml"]
    ref_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(cmd + run_overrides(warmed_model, ref_dir, "logging.wandb=true"), cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True, timeout=1200)
    with own_session(cmd + run_overrides(warmed_model, killed_dir, "train.steps=40", "logging.wandb=true"), env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 1200
        while latest_step(killed_dir) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    # leaving the block SIGKILLs the whole driver: Ray and vLLM with it
    assert latest_step(killed_dir) >= 2
    killed_at = latest_step(killed_dir)
    done = subprocess.run(cmd + run_overrides(warmed_model, killed_dir, "logging.wandb=true"), cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    reference, resumed = step_rows(ref_dir), step_rows(killed_dir)
    if killed_at > 4:  # the kill came late: the resumed run had nothing left to do
        pytest.fail(f"the run was killed only after step {killed_at}")
    assert_same_steps(resumed, reference, after=killed_at)
    ids = {p.name.rsplit("-", 1)[-1] for p in (killed_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids  # W&B continued the same run


def test_used_run_dir_without_checkpoint_is_refused_then_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = load_config(None, [f"logging.run_dir={run_dir}"])
    with pytest.raises(ConfigError, match="already holds a run .*metrics.jsonl.* no complete checkpoint"):
        checkpoints.resolve_resume(cfg, run_dir)
    cfg = load_config(None, [f"logging.run_dir={run_dir}", "train.resume=false", "logging.overwrite=true"])
    assert checkpoints.resolve_resume(cfg, run_dir) is None
    assert not (run_dir / "metrics.jsonl").exists()


def _fake_checkpoint(run_dir: Path, step: int, cfg) -> Path:
    from launcher.config import to_yaml

    tmp = checkpoints.begin(run_dir, step)
    return checkpoints.commit(run_dir, tmp, {"step": step}, to_yaml(cfg), keep=2)


def test_latest_pointer_pruning_and_interrupted_saves(tmp_path):
    cfg = load_config(None, [])
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step, cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    checkpoints.begin(tmp_path, 4)  # a save that never finished
    assert checkpoints.latest(tmp_path).name == "step-000003"
    assert checkpoints.read_state(checkpoints.latest(tmp_path)) == {"step": 3, "manifest": "manifest.json"}
    auto = load_config(None, [f"logging.run_dir={tmp_path}"])
    (tmp_path / "metrics.jsonl").write_text("")
    assert checkpoints.resolve_resume(auto, tmp_path).name == "step-000003"


@pytest.mark.parametrize("override", ["rollout.group_size=6", "learner.num_ranks=2", "learner.zero_stage=3",
                                      "model.path=elsewhere"])
def test_changes_that_would_corrupt_the_state_are_refused(tmp_path, override):
    cfg = load_config("configs/tiny_cpu.yaml", [])
    ckpt = _fake_checkpoint(tmp_path, 5, cfg)
    checkpoints.check_compatible(load_config("configs/tiny_cpu.yaml", ["train.steps=500", "logging.wandb=false"]),
                                 ckpt)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        checkpoints.check_compatible(load_config("configs/tiny_cpu.yaml", [override]), ckpt)


def test_rows_past_the_checkpoint_and_a_torn_line_are_dropped(tmp_path):
    from launcher.metrics import drop_rows_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3, 4)) + '{"step": 5, "lo')
    assert drop_rows_after(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


SFT_COMPARED = ("epoch", "loss", "grad_norm", "lr", "num_tokens")


def _sft_overrides(model: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", "model.build_tiny_if_missing=false", f"logging.run_dir={run_dir}",
            "logging.progress_bar=false", "logging.wandb=true", "train.format_warmup_steps=0", "sft.steps=12",
            "sft.batch_size=8", "sft.lr=3e-3", "train.checkpoint_every=2", "train.keep_checkpoints=0",
            "train.eval_at_end=false", "cluster.cpus_per_actor=0.5", *extra]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sigkilled_sft_run_resumes_exactly(tiny_model_dir, tmp_path):
    """`medvlm-r1 sft` on the shared trainer skeleton: SIGKILLed after a checkpoint, the same command again
    resumes it, and every step's loss, gradient norm, rate and epoch, and the final weights, equal an
    uninterrupted run's bit for bit; W&B continues the same run."""
    cmd = [sys.executable, "-m", "launcher", "sft", "configs/tiny_cpu_sft.yaml"]
    ref_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(cmd + _sft_overrides(tiny_model_dir, ref_dir), cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True, timeout=1200)
    with own_session(cmd + _sft_overrides(tiny_model_dir, killed_dir, "sft.steps=40"), env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 1200
        while latest_step(killed_dir) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    killed_at = latest_step(killed_dir)
    assert 2 <= killed_at < 12, f"killed after step {killed_at}"
    done = subprocess.run(cmd + _sft_overrides(tiny_model_dir, killed_dir), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {killed_dir / 'checkpoints' / f'step-{killed_at:06d}'} (step {killed_at})" in done.stderr

    def steps(run_dir: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: r[k] for k in ("step", *SFT_COMPARED)} for r in rows if "epoch" in r]

    reference, resumed = steps(ref_dir), steps(killed_dir)
    assert [r["step"] for r in resumed] == list(range(1, 13))  # each step exactly once
    assert resumed == reference
    assert all(r["grad_norm"] > 0 for r in reference[killed_at:])  # the resumed steps did learn
    from safetensors.torch import load_file

    a, b = load_file(str(ref_dir / "final/model.safetensors")), load_file(str(killed_dir / "final/model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
    assert json.loads((killed_dir / "summary.json").read_text())["last_checkpoint"].endswith("step-000012")
    ids = {p.name.rsplit("-", 1)[-1] for p in (killed_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids  # W&B continued the same run
