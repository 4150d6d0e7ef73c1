"""`medvlm-r1 train`: GRPO's step on the shared run skeleton (launcher/trainer.py), from start (or a checkpoint)
to the saved policy and its summary."""
from __future__ import annotations

import logging
import time

from launcher.config import Config
from launcher.controller import Controller
from launcher.metrics import logprob_mismatch, rollout_metrics, sample_rows
from launcher.overlap import RolloutQueue
from launcher.trainer import (  # noqa: F401  (LearnerRankLost: the command's results)
    LearnerRankLost, RunResult, Trainer, eval_summary, launch, print_result)

log = logging.getLogger(__name__)


def run_training(cfg: Config) -> RunResult:
    return launch(GRPOTrainer, cfg)


class GRPOTrainer(Trainer):
    """GRPO's step (sample, score, train, push the weights; launcher/overlap.py samples ahead) and what it
    adds to the shared loop: the weight version and the worker replacements in checkpoints, sample rows,
    the learner/engine log-prob check."""

    method, command, step_row_key = "grpo", "train", "reward/total"

    def __init__(self, *args):
        super().__init__(*args)
        self.rollouts = RolloutQueue(self.cfg, self.sampler, self.controller, self.step)  # batches sent ahead of training
        self.warned_mismatch = False  # a learner/engine log-prob mismatch was reported (once per run)
        self.restarts_before = 0  # rollout workers replaced by earlier processes of this run, up to the checkpoint
        self.restarts_logged = 0  # this process's replacements already counted in a step row
        self._last = None  # the step's batch and records, until after_step logs sample rows

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        row, batch, records = _step(cfg, self.controller, self.rollouts, step)
        # Replacements since the last row: this step's, and those during a checkpoint or evaluation since.
        row["faults/worker_restarts"] = self.controller.restarts - self.restarts_logged
        self.restarts_logged = self.controller.restarts
        self.version = row["weight_version"]
        row["time/elapsed_s"] = time.perf_counter() - self.started
        if not self.warned_mismatch and (warning := logprob_mismatch(row, cfg.learner.precision, cfg.learner.sync_every)):
            log.warning(warning)
            self.warned_mismatch = True
        self._last = (batch, records)
        return row

    def after_step(self, row: dict) -> None:
        cfg, step = self.cfg, self.step
        if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == 1):
            batch, records = self._last
            self.sink.log_samples(step, sample_rows(batch, records, cfg.logging.num_samples_logged))
        self._last = None

    def before_checkpoint(self) -> None:
        if self.controller.learner_ahead:
            # learner.sync_every > 1 and no push this step: push now, so that the checkpoint's weights are the
            # version the workers hold, and a resumed run samples its next batch with what this one does.
            self.version += 1
            self.controller.sync(self.version, queued_prompts=self.rollouts.queued_prompts())

    def sampler_state(self) -> dict:
        return self.rollouts.sampler_state()

    def driver_state(self) -> dict:
        return {"worker_restarts": self.restarts_before + self.controller.restarts}

    def restore_driver_state(self, state: dict) -> None:
        """The sampler and the queue at the checkpoint's step, and the restored weights into every worker."""
        self.restarts_before = int(state.get("worker_restarts", 0))  # the budget, cluster.max_worker_restarts, is per process
        self.rollouts.restore(state["sampler"], self.step)
        self.controller.sync(self.version)

    def summarize(self) -> dict:
        return _summarize(self.history, self.evals)

    def finish_summary(self, summary: dict) -> None:
        summary["faults/worker_restarts"] = self.restarts_before + self.controller.restarts  # the run's, across resumes


def _step(cfg: Config, controller: Controller, rollouts: RolloutQueue, step: int):
    """Train on step `step`'s batch and publish the weights; with train.max_staleness >= 1 the next
    batches are sampled meanwhile (launcher/overlap.py)."""
    t0 = time.perf_counter()
    rollouts.send_ahead(step)
    taken = rollouts.take(step)
    batch, records = taken.batch, taken.records
    version = controller.version  # the version the workers hold (a replacement may have pushed a newer one just now)
    staleness = version - batch.weight_version  # weight versions published between sampling and training
    t1 = time.perf_counter()
    stats = controller.train(batch, records)
    t2 = time.perf_counter()
    sent = 0
    if step % cfg.learner.sync_every == 0:
        version += 1
        sent = controller.sync(version, queued_prompts=rollouts.queued_prompts())
    t3 = time.perf_counter()
    tokens = sum(len(c) for c in batch.completion_token_ids)
    row = {"step": step, **rollout_metrics(taken.sampled), **taken.stats, **stats, "weight_version": version,
           "rollout_weight_version": batch.weight_version, "staleness/mean": staleness, "staleness/max": staleness,
           "sync/bytes": sent,
           "time/generate_s": t1 - t0, "time/rollout_s": batch.generate_s, "time/train_s": t2 - t1,
           "time/sync_s": t3 - t2, "time/step_s": t3 - t0, "throughput/tokens_per_s": tokens / (t3 - t0)}
    return row, batch, records


def _summarize(history: list[dict], evals: dict) -> dict:
    window = max(1, min(10, len(history) // 2)) if history else 0
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows) if rows else None  # noqa: E731
    out = {"method": "grpo", "steps": len(history)}
    for key in ("reward/accuracy", "reward/format", "reward/total"):
        out[f"first{window}/{key}"] = mean(history[:window], key)
        out[f"last{window}/{key}"] = mean(history[-window:], key)
    lags = [r["staleness/max"] for r in history if "staleness/max" in r]
    if lags:
        out["staleness/mean"], out["staleness/max"] = sum(lags) / len(lags), max(lags)
    return {**out, **eval_summary(evals)}


def print_summary(result: RunResult) -> None:
    s, lines = result.summary, []
    for key in ("reward/accuracy", "reward/format", "reward/total"):
        first = next((v for k, v in s.items() if k.startswith("first") and k.endswith(key)), None)
        last = next((v for k, v in s.items() if k.startswith("last") and k.endswith(key)), None)
        if first is not None and last is not None:
            lines.append(f"{key:18s} first steps {first:.3f} -> last steps {last:.3f}")
    print_result(result, lines)
