"""`medvlm-r1 train`: the GRPO loop from start (or a checkpoint) to the saved policy and its summary."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

from launcher import checkpoints, cluster, driver, stops
from launcher.actor_group import ActorFailure, ActorTimeoutError
from launcher.config import Config, to_dict, to_yaml
from launcher.data import PromptSampler, build_datasets
from launcher.evaluate import eval_metrics, evaluate_sets, write_outputs
from launcher.metrics import MetricsSink, logprob_mismatch, read_rows
from launcher.overlap import RolloutQueue
from launcher.report import load_evaluations

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    summary: dict


class LearnerRankLost(RuntimeError):
    """A learner rank failed: the run cannot go on in place; the message says how to resume."""


def run_training(cfg: Config) -> RunResult:
    run_dir = driver.make_run_dir(cfg)
    resume_from = checkpoints.resolve_resume(cfg, run_dir)
    saved = None
    if resume_from is not None:
        checkpoints.check_compatible(cfg, resume_from)
        saved = checkpoints.read_state(resume_from)
        log.info("resuming from %s (step %d)", resume_from, saved["step"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    train_records, eval_sets = build_datasets(cfg.data)  # data errors surface before anything heavy starts
    log.info("%d training prompts; evaluation sets %s", len(train_records), {k: len(v) for k, v in eval_sets.items()})
    cluster.start_ray(cfg)
    stops.reinstall()  # ray.init replaced the SIGTERM handler
    watch = watch_cluster(run_dir)
    try:
        return _train(cfg, run_dir, resume_from, saved, train_records, eval_sets)
    finally:
        watch.stop()


def _train(cfg: Config, run_dir: Path, resume_from: Optional[Path], saved: Optional[dict], train_records,
           eval_sets: dict) -> RunResult:
    model_path = saved["model_path"] if saved else starting_policy(cfg, run_dir, train_records)
    stops.check()
    actors = driver.start_actors(cfg, model_path)
    actors.faults_dir = run_dir / "faults"
    sink = None
    try:
        stops.check()
        sink = MetricsSink(run_dir, cfg.logging, to_dict(cfg), cfg.train.steps,
                           resume_step=saved["step"] if saved else None, wandb_id=saved and saved.get("wandb_id"))
        run = Run(cfg, actors, sink, run_dir, PromptSampler(train_records, cfg.train.seed), eval_sets)
        if saved:
            run.restore(resume_from, saved)
        stops.defer()  # the loop can checkpoint now: a signal stops it at the next step boundary
        stops.check()  # one that arrived while start-up was deferred (a library caller's own install)
        return run.finish(run.loop())
    except ActorFailure as exc:
        if exc.kind == actors.learners.kind:
            driver.stop_stuck_learners(actors, exc)
            stacks = f" (stacks in {actors.faults_dir})" if isinstance(exc, ActorTimeoutError) else ""
            raise LearnerRankLost(f"{exc}{stacks}; a learner rank cannot be replaced in place: "
                                  f"{_resume_hint(run_dir)}") from exc
        raise
    finally:
        if sink is not None:
            sink.close()
        driver.stop_actors(actors)


def watch_cluster(run_dir: Path) -> cluster.GcsWatch:
    """From here on, a Ray cluster that goes away (its head killed, its node lost) ends the command
    within about half a minute: one line saying so, the resume command, exit 1, none of this process's
    Ray processes left."""
    def on_lost(seconds: float) -> None:
        if stops.requested():
            return  # a stop is ending the run, and the Ray nodes stop with it (scancel, time limit)
        line = (f"medvlm-r1: lost the Ray cluster: its GCS has not answered for {seconds:.0f} s (the Ray head "
                f"or its node is gone); {_resume_hint(run_dir)}")
        cluster.exit_now(1, last_line=line)

    return cluster.GcsWatch(on_lost)


def starting_policy(cfg: Config, run_dir: Path, train_records) -> str:
    """The policy's first checkpoint: the configured model, after the format warm-up when one is asked for."""
    model_path = driver.prepare_model(cfg)
    if cfg.train.format_warmup_steps > 0:
        model_path = driver.format_warmup(cfg, model_path, train_records, run_dir)
    return model_path


def _resume_hint(run_dir: Path) -> str:
    last = checkpoints.latest(run_dir)
    if last is None:
        return "no checkpoint was written yet (set train.checkpoint_every)"
    return f"resume from {last} with: medvlm-r1 train {run_dir / 'config.yaml'} logging.run_dir={run_dir}"


@dataclasses.dataclass
class Run:
    """The loop's state between steps: what a checkpoint saves and a resume restores."""

    cfg: Config
    actors: driver.Actors
    sink: MetricsSink
    run_dir: Path
    sampler: PromptSampler
    eval_sets: dict
    step: int = 0
    version: int = 0
    history: list = dataclasses.field(default_factory=list)
    evals: dict = dataclasses.field(default_factory=dict)
    last_checkpoint: Optional[Path] = None
    rollouts: RolloutQueue = dataclasses.field(init=False)  # batches sent ahead of training (launcher/overlap.py)
    started: float = 0.0  # perf_counter when this process's GRPO steps began
    warned_mismatch: bool = False  # a learner/engine log-prob mismatch was reported (once per run)
    restarts_before: int = 0  # rollout workers replaced by earlier processes of this run, up to the checkpoint
    restarts_logged: int = 0  # this process's replacements already counted in a step row

    def __post_init__(self):
        self.rollouts = RolloutQueue(self.cfg, self.sampler, self.step)

    def loop(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and self.eval_sets and (cfg.train.eval_at_end or cfg.train.eval_every):
            self.evals[0] = self._evaluate(step=0)
        self.started = time.perf_counter()
        while self.step < cfg.train.steps:
            self.step += 1
            self._one_step()
            if cfg.train.checkpoint_every and (self.step % cfg.train.checkpoint_every == 0
                                               or self.step == cfg.train.steps):
                self.checkpoint()
            if stops.requested():
                stops.check(str(self.checkpoint()))
        steps_s = time.perf_counter() - self.started
        last = cfg.train.steps
        if self.eval_sets and cfg.train.eval_at_end and last not in self.evals:
            self.evals[last] = self._evaluate(last)
        return {**_summarize(self.history, self.evals), "time/grpo_s": steps_s}

    def _one_step(self) -> None:
        cfg, step = self.cfg, self.step
        row, batch, records = _step(cfg, self.actors, self.rollouts, step)
        # Replacements since the last row: this step's, and those during a checkpoint or evaluation since.
        row["faults/worker_restarts"] = self.actors.restarts - self.restarts_logged
        self.restarts_logged = self.actors.restarts
        self.version = row["weight_version"]
        row["time/elapsed_s"] = time.perf_counter() - self.started
        if not self.warned_mismatch and (warning := logprob_mismatch(row, cfg.learner.precision, cfg.learner.sync_every)):
            log.warning(warning)
            self.warned_mismatch = True
        self.history.append(row)
        self.sink.log_step(row)
        if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == 1):
            self.sink.log_samples(step, driver.sample_rows(batch, records, cfg.logging.num_samples_logged))
        if self.eval_sets and cfg.train.eval_every and step % cfg.train.eval_every == 0:
            self.evals[step] = self._evaluate(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
            # A Hugging Face policy checkpoint (loadable by `medvlm-r1 eval`); full state is in checkpoints/.
            driver.save_policy(self.actors, self.run_dir / f"checkpoint-{step:06d}")

    def checkpoint(self) -> Path:
        """The full state after step `self.step`, written atomically; returns its folder."""
        if self.last_checkpoint is not None and self.last_checkpoint.name == checkpoints.step_dir(
                self.run_dir, self.step).name:
            return self.last_checkpoint
        t0 = time.perf_counter()
        if self.actors.learner_ahead:
            # learner.sync_every > 1 and no push this step: push now, so that the checkpoint's weights are the
            # version the workers hold, and a resumed run samples its next batch with what this one does.
            self.version += 1
            driver.sync_weights(self.actors, self.version, queued_prompts=self.rollouts.queued_prompts())
        with checkpoints.saving(self.run_dir, self.step) as tmp:  # a failed save removes its .tmp/
            driver.save_learner_state(self.actors, tmp / checkpoints.LEARNER_DIR)
            state = {"step": self.step, "weight_version": self.version, "sampler": self.rollouts.sampler_state(),
                     "wandb_id": self.sink.wandb_id, "model_path": self.actors.model_path,
                     "worker_restarts": self.restarts_before + self.actors.restarts}
            self.last_checkpoint = checkpoints.commit(self.run_dir, tmp, state, to_yaml(self.cfg),
                                                      self.cfg.train.keep_checkpoints)
        self.sink.log_row({"step": self.step, "time/checkpoint_s": time.perf_counter() - t0})
        log.info("checkpoint of step %d: %s (%.1f s)", self.step, self.last_checkpoint, time.perf_counter() - t0)
        return self.last_checkpoint

    def restore(self, checkpoint: Path, state: dict) -> None:
        """Learner state from the checkpoint, the restored weights into every worker, the sampler and
        the loop's records of the steps already done."""
        driver.load_learner_state(self.actors, checkpoint / checkpoints.LEARNER_DIR)
        self.step, self.version = int(state["step"]), int(state["weight_version"])
        self.restarts_before = int(state.get("worker_restarts", 0))  # the budget, cluster.max_worker_restarts, is per process
        self.rollouts.restore(state["sampler"], self.step)
        driver.sync_weights(self.actors, self.version)
        rows = read_rows(self.run_dir / "metrics.jsonl")
        self.history = [r for r in rows if "reward/total" in r and r["step"] <= self.step]
        self.evals = {s: r for s, r in load_evaluations(self.run_dir).items() if s <= self.step}
        self.last_checkpoint = checkpoint

    def _evaluate(self, step: int) -> dict:
        return evaluate_and_log(self.cfg, self.actors, self.sink, self.eval_sets, step)

    def finish(self, summary: dict) -> RunResult:
        final_dir = self.run_dir / "final"
        driver.save_policy(self.actors, final_dir)
        summary["final_dir"] = str(final_dir)
        if self.last_checkpoint is not None:
            summary["last_checkpoint"] = str(self.last_checkpoint)
        summary["faults/worker_restarts"] = self.restarts_before + self.actors.restarts  # the run's, across resumes
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        self.sink.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        return RunResult(self.run_dir, final_dir, summary)


def evaluate_and_log(cfg: Config, actors: driver.Actors, sink: MetricsSink, eval_sets: dict, step: int) -> dict:
    """Greedy evaluation by the rollout workers (with the weights last synced), written to eval/stepNNNNNN."""
    t0 = time.perf_counter()
    results, rows = evaluate_sets(actors.workers, eval_sets, cfg.rollout.max_new_tokens,
                                  run=lambda args, doing: driver.greedy_with_recovery(actors, args, doing))
    write_outputs(sink.run_dir / "eval" / f"step{step:06d}", results, rows, {"step": step, "decoding": "greedy"})
    sink.log_row({"step": step, **eval_metrics(results), "time/eval_s": time.perf_counter() - t0})
    return results


def _step(cfg: Config, actors: driver.Actors, rollouts: RolloutQueue, step: int):
    """Train on step `step`'s batch and publish the weights; with train.max_staleness >= 1 the next
    batches are sampled meanwhile (launcher/overlap.py)."""
    t0 = time.perf_counter()
    rollouts.send_ahead(actors, step)
    taken = rollouts.take(actors, step)
    batch, records = taken.batch, taken.records
    version = actors.version  # the version the workers hold (a replacement may have pushed a newer one just now)
    staleness = version - batch.weight_version  # weight versions published between sampling and training
    t1 = time.perf_counter()
    stats = driver.train(actors, batch, records)
    t2 = time.perf_counter()
    sent = 0
    if step % cfg.learner.sync_every == 0:
        version += 1
        sent = driver.sync_weights(actors, version, queued_prompts=rollouts.queued_prompts())
    t3 = time.perf_counter()
    tokens = sum(len(c) for c in batch.completion_token_ids)
    row = {"step": step, **driver.rollout_metrics(taken.sampled), **taken.stats, **stats, "weight_version": version,
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
    if evals:
        first, last = min(evals), max(evals)
        out["eval/base"] = {name: r["accuracy"] for name, r in evals[first].items()}
        out["eval/final"] = {name: r["accuracy"] for name, r in evals[last].items()}
    return out


def print_summary(result: RunResult) -> None:
    s = result.summary
    print(f"\nrun directory: {result.run_dir}")
    print(f"final policy:  {result.final_dir}")
    for key in ("reward/accuracy", "reward/format", "reward/total"):
        first = next((v for k, v in s.items() if k.startswith("first") and k.endswith(key)), None)
        last = next((v for k, v in s.items() if k.startswith("last") and k.endswith(key)), None)
        if first is not None and last is not None:
            print(f"{key:18s} first steps {first:.3f} -> last steps {last:.3f}")
    if "eval/final" in s:
        print("held-out accuracy (start -> end):")
        for name, acc in s["eval/final"].items():
            print(f"  {name:8s} {s['eval/base'].get(name, float('nan')):.3f} -> {acc:.3f}")
