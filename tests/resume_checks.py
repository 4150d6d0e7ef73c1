"""What the resume tests compare: the short run's overrides, its step rows, a run dir cut back to a
checkpoint as a killed run leaves it, and step-by-step equality with an uninterrupted run."""
import json
import shutil
from pathlib import Path

COMPARED = ("reward/total", "reward/accuracy", "loss", "grad_norm", "weight_version", "rollout_weight_version")


def run_overrides(model: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", "model.build_tiny_if_missing=false", f"logging.run_dir={run_dir}",
            "logging.progress_bar=false", "logging.wandb=false", "logging.sample_every=0",
            "train.format_warmup_steps=0", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0",
            "train.eval_at_end=false", "rollout.prompts_per_step=4", "rollout.group_size=4",
            "rollout.max_new_tokens=24", "learner.micro_batch_size=8", "learner.lr=2e-3",
            "cluster.cpus_per_actor=0.5", *extra]


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/total" in r]


def cut_back_to(src: Path, dst: Path, step: int) -> None:
    """`dst` as `src` was when its run was killed right after the checkpoint of `step` (later rows and
    files included, as a killed run leaves them)."""
    shutil.copytree(src, dst)
    for later in (dst / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    shutil.rmtree(dst / "final")
    (dst / "summary.json").unlink()


def assert_same_steps(resumed: list[dict], reference: list[dict], after: int) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]  # each step exactly once
    moved = [r for r in reference if r["step"] > after]
    assert any(r["grad_norm"] > 0 for r in moved), "no learning signal: the comparison would be vacuous"
    for got, want in zip(resumed, reference):
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, got["step"]


def latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0
