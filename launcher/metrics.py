"""Where a run's numbers go: metrics.jsonl, W&B (offline without an API key), a tqdm bar."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from launcher.config import LoggingConfig
from protocol.batch import RolloutBatch

log = logging.getLogger(__name__)

# Every step row carries at least these keys (the README and the tests rely on them).
STEP_KEYS = (
    "step", "reward/total", "reward/format", "reward/accuracy", "loss", "kl", "entropy",
    "response_length/mean", "clip_fraction", "grad_norm", "lr", "weight_version", "groups/zero_signal_fraction",
    "time/generate_s", "time/train_s", "time/sync_s", "time/step_s", "throughput/tokens_per_s",
)
# ... and every step row of a supervised run (`medvlm-r1 sft`) these.
SFT_STEP_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "num_tokens", "time/step_s", "throughput/tokens_per_s")


# Mean |learner - engine| log-prob per token of a batch sampled with the learner's own weights, above which more
# than kernel rounding differs. fp32 on CPU stays near 1e-5 (tests/commands/test_learning_run.py); bf16 keeps 8 bits.
LOGPROB_AGREEMENT = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}


def logprob_mismatch(row: dict, precision: str, sync_every: int = 1) -> Optional[str]:
    """A warning for a step whose batch was sampled after a sync with the very weights the learner then held
    (no staleness, and the step before it pushed its weights: with learner.sync_every > 1 the learner may
    hold updates the engines have not seen), when the two sides' log-probs of its tokens differ by more
    than the precision explains."""
    if row.get("staleness/max") != 0 or row.get("rollout_weight_version", 0) < 1 or (row["step"] - 1) % sync_every:
        return None
    diff, limit = row.get("logprob_diff/mean_abs"), LOGPROB_AGREEMENT[precision]
    if diff is None or diff <= limit:
        return None
    return (f"step {row['step']}: the engine's log-probs differ from the learner's by {diff:.2g} per token on the same "
            f"weights (version {row['rollout_weight_version']}; {precision} agrees within {limit:g}). Likely causes: "
            "a tensor that did not reach the engine (a tied or renamed weight), other image preprocessing on the two "
            "sides (min/max_pixels), or the engine's sampler and kernels (on GPU vLLM's V2 model runner; "
            "VLLM_USE_V2_MODEL_RUNNER=0 selects V1). Shown once per run.")


def rollout_metrics(batch: RolloutBatch) -> dict:
    """A rollout batch's step-row numbers: mean rewards, response lengths, the truncated fraction."""
    n = batch.num_samples
    lengths = [len(c) for c in batch.completion_token_ids]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {f"reward/{k}": mean(v) for k, v in batch.rewards.items()}
    out["reward/total"] = mean(batch.total_rewards)
    out["response_length/mean"] = mean(lengths)
    out["response_length/max"] = max(lengths)
    out["response_length/truncated_fraction"] = sum(f == "length" for f in batch.finish_reasons) / n
    return out


def sample_rows(batch: RolloutBatch, records: list, count: int) -> list[dict]:
    """The first `count` samples of a batch as sample-table rows (image, prompt, completion, rewards)."""
    from medvqa.prompt import question_text

    rows = []
    for i in range(min(count, batch.num_samples)):
        rec = records[i // batch.group_size]
        rows.append({"image": rec.load_image(), "prompt": question_text(rec), "completion": batch.completion_texts[i],
                     "reward/total": batch.total_rewards[i], "answer": rec.answer, "modality": rec.modality,
                     "record_id": rec.id, **{f"reward/{k}": v[i] for k, v in batch.rewards.items()}})
    return rows


def _clean(value):
    """JSON has no NaN/inf; write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite a JSONL file of step rows keeping those with step <= `step`; returns how many were
    dropped. A torn last line (the writer was killed mid-write) is dropped too."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class MetricsSink:
    """One object per run: append a row per step, mirror it to W&B, draw the progress bar.

    `step_keys` must be in every step row; `bar_keys` are (label, key) pairs shown on the bar.
    """

    def __init__(self, run_dir: Path, logging_cfg: LoggingConfig, config_dict: dict, total_steps: int,
                 resume_step: Optional[int] = None, wandb_id: Optional[str] = None,
                 step_keys: tuple = STEP_KEYS, desc: str = "grpo",
                 bar_keys: tuple = (("reward", "reward/total"), ("acc", "reward/accuracy"))):
        """A resumed run (`resume_step`, the checkpoint's step) keeps each step once: rows written
        after the checkpoint by the interrupted run are dropped, and W&B continues run `wandb_id`."""
        self.run_dir = Path(run_dir)
        self.cfg = logging_cfg
        self.step_keys, self.bar_keys = step_keys, bar_keys
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                drop_rows_after(self.run_dir / name, resume_step)
        self._file = open(self.path, "a", buffering=1)
        self._wandb = self._start_wandb(config_dict, wandb_id) if logging_cfg.wandb else None
        self.wandb_id = self._wandb.id if self._wandb is not None else None
        self._bar = None
        if logging_cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, desc=desc, unit="step",
                             dynamic_ncols=True)

    def _start_wandb(self, config_dict: dict, run_id: Optional[str]):
        import wandb

        # Offline unless the user has credentials: runs on an air-gapped node can be synced later.
        if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
            os.environ["WANDB_MODE"] = "offline"
        return wandb.init(
            project=self.cfg.wandb_project, name=self.run_dir.name, group=self.cfg.wandb_group,
            tags=list(self.cfg.tags), config=config_dict, dir=str(self.run_dir), reinit="finish_previous",
            id=run_id, resume="allow" if run_id else None,
        )

    def log_step(self, row: dict) -> None:
        missing = [k for k in self.step_keys if k not in row]
        if missing:
            raise KeyError(f"metrics row for step {row.get('step')} lacks {missing}")
        self.log_row(row)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({label: f"{row[k]:.3f}" for label, k in self.bar_keys}, refresh=False)

    def log_row(self, row: dict) -> None:
        """Any row with a `step` (step metrics or evaluation results) goes to both sinks."""
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A table of sample completions: image, prompt, completion, rewards, ground truth."""
        image_dir = self.run_dir / "samples"
        image_dir.mkdir(exist_ok=True)
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for i, s in enumerate(samples):
                image_path = image_dir / f"step{step:06d}_{i}.png"
                s["image"].save(image_path)
                row = {k: v for k, v in s.items() if k != "image"}
                f.write(json.dumps({"step": step, "image_file": str(image_path.relative_to(self.run_dir)), **row}) + "\n")
        if self._wandb is None:
            return
        import wandb

        columns = ["step", "image", "prompt", "completion", "reward/total", "reward/format",
                   "reward/accuracy", "answer", "modality"]
        table = wandb.Table(columns=columns)
        for s in samples:
            table.add_data(step, wandb.Image(s["image"]), s["prompt"], s["completion"], s["reward/total"],
                           s.get("reward/format"), s.get("reward/accuracy"), s["answer"], s["modality"])
        self._wandb.log({"samples": table}, step=step)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> Optional[str]:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        wandb_dir = None
        if self._wandb is not None:
            wandb_dir = self._wandb.dir
            self._wandb.finish()
        return wandb_dir
