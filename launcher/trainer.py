"""The run skeleton `medvlm-r1 train` (GRPO) and `medvlm-r1 sft` share, written once: start-up (run dir,
resume choice, data, Ray, the starting policy, the actors), the step loop, evaluation, Hugging Face saves,
full checkpoints and resume, the stop policy, a lost learner rank, the summary and teardown.

An algorithm subclasses `Trainer` and supplies its step (`train_step`) and what it adds to a checkpoint:
`launcher/train_loop.py:GRPOTrainer`, `launcher/sft_loop.py:SFTTrainer`. `launch(TrainerClass, cfg)` runs it.
The non-finite guard sits in the learner, under both steps (learner/finite_guard.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import ray

from launcher import checkpoints, cluster, stops
from launcher.actor_group import ActorFailure, ActorTimeoutError
from launcher.config import Config, to_dict, to_yaml
from launcher.controller import Controller
from launcher.data import PromptSampler, build_datasets
from launcher.evaluate import eval_metrics, write_outputs
from launcher.metrics import MetricsSink, read_rows
from launcher.report import load_evaluations
from launcher.stops import StopSignals

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    summary: dict


class LearnerRankLost(RuntimeError):
    """A learner rank failed: the run cannot go on in place; the message says how to resume."""


class Trainer:
    """The loop's state between steps (what a checkpoint saves and a resume restores) and the loop itself.

    `cfg` is the config the actors were built from (`plan`'s result); `cfg.train.steps` is the run's length.
    `config_yaml` is the run's own config, as checkpoints keep it (a resume compares it with the command's).
    """

    method = ""  # the summary's "method"
    command = ""  # the medvlm-r1 command that runs it (and resumes it)
    step_row_key = ""  # a key that this trainer's step rows hold and no other row does (resume rebuilds history)
    sink_options: dict = {}  # MetricsSink's step_keys, desc and bar_keys

    def __init__(self, cfg: Config, controller: Controller, sink: MetricsSink, run_dir: Path,
                 sampler: PromptSampler, eval_sets: dict, config_yaml: str):
        self.cfg, self.controller, self.sink, self.run_dir, self.config_yaml = cfg, controller, sink, run_dir, config_yaml
        self.sampler, self.eval_sets = sampler, eval_sets
        self.step = 0
        self.version = 0  # the weight version the rollout workers hold
        self.history: list[dict] = []
        self.evals: dict = {}
        self.last_checkpoint: Optional[Path] = None
        self.started = 0.0  # perf_counter when this process's steps began
        self.signals = controller.signals  # the stop requests the loop acts on at each step boundary

    # ---- what an algorithm supplies -------------------------------------------------------------

    @classmethod
    def plan(cls, cfg: Config, train_records: list) -> Config:
        """The config the actors and the loop run with (the run's own config unless the algorithm needs
        another view of it)."""
        return cfg

    def train_step(self) -> dict:
        """Step `self.step`: train, and return its metrics row (logged by the loop)."""
        raise NotImplementedError

    def after_step(self, row: dict) -> None:
        """After the row is logged, before evaluation and saves (sample rows, for instance)."""

    def before_evaluation(self) -> None:
        """Make the rollout workers hold the learner's current weights, if they may not."""

    def before_checkpoint(self) -> None:
        """Bring the actors to a state a resume can reproduce."""

    def sampler_state(self) -> dict:
        return self.sampler.state()

    def driver_state(self) -> dict:
        """What the algorithm adds to the checkpoint's driver state."""
        return {}

    def restore_driver_state(self, state: dict) -> None:
        """The algorithm's share of a resume, after the learner state is loaded and step and version are set."""
        self.sampler.restore(state["sampler"])

    def summarize(self) -> dict:
        raise NotImplementedError

    def finish_summary(self, summary: dict) -> None:
        """Last additions to the summary before it is written."""

    # ---- the skeleton ---------------------------------------------------------------------------

    def loop(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and self.eval_sets and (cfg.train.eval_at_end or cfg.train.eval_every):
            self.evals[0] = self.evaluate(step=0)
        self.started = time.perf_counter()
        while self.step < cfg.train.steps:
            self.step += 1
            step = self.step
            row = self.train_step()
            self.history.append(row)
            self.sink.log_step(row)
            self.after_step(row)
            if self.eval_sets and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self.evals[step] = self.evaluate(step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                # A Hugging Face policy checkpoint (loadable by `medvlm-r1 eval`); full state is in checkpoints/.
                self.controller.save(self.run_dir / f"checkpoint-{step:06d}")
            if cfg.train.checkpoint_every and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps):
                self.checkpoint()
            if self.signals.requested():
                self.signals.check(str(self.checkpoint()))
        steps_s = time.perf_counter() - self.started
        last = cfg.train.steps
        if self.eval_sets and cfg.train.eval_at_end and last not in self.evals:
            self.evals[last] = self.evaluate(last)
        return {**self.summarize(), f"time/{self.method}_s": steps_s}

    def evaluate(self, step: int) -> dict:
        self.before_evaluation()
        return evaluate_and_log(self.cfg, self.controller, self.sink, self.eval_sets, step)

    def checkpoint(self) -> Path:
        """The full state after step `self.step`, written atomically; returns its folder."""
        if self.last_checkpoint is not None and self.last_checkpoint.name == checkpoints.step_dir(
                self.run_dir, self.step).name:
            return self.last_checkpoint
        t0 = time.perf_counter()
        self.before_checkpoint()
        with checkpoints.saving(self.run_dir, self.step) as tmp:  # a failed save removes its .tmp/
            self.controller.save_state(tmp / checkpoints.LEARNER_DIR)
            state = {"step": self.step, "weight_version": self.version, "sampler": self.sampler_state(),
                     "wandb_id": self.sink.wandb_id, "model_path": self.controller.model_path, **self.driver_state()}
            self.last_checkpoint = checkpoints.commit(self.run_dir, tmp, state, self.config_yaml,
                                                      self.cfg.train.keep_checkpoints)
        self.sink.log_row({"step": self.step, "time/checkpoint_s": time.perf_counter() - t0})
        log.info("checkpoint of step %d: %s (%.1f s)", self.step, self.last_checkpoint, time.perf_counter() - t0)
        return self.last_checkpoint

    def restore(self, checkpoint: Path, state: dict) -> None:
        """Learner state from the checkpoint, the algorithm's own state, and the loop's records of the steps
        already done."""
        self.controller.restore(checkpoint / checkpoints.LEARNER_DIR)
        self.step, self.version = int(state["step"]), int(state["weight_version"])
        self.restore_driver_state(state)
        rows = read_rows(self.run_dir / "metrics.jsonl")
        self.history = [r for r in rows if self.step_row_key in r and r["step"] <= self.step]
        self.evals = {s: r for s, r in load_evaluations(self.run_dir).items() if s <= self.step}
        self.last_checkpoint = checkpoint

    def finish(self, summary: dict) -> RunResult:
        final_dir = self.run_dir / "final"
        self.controller.save(final_dir)
        summary["final_dir"] = str(final_dir)
        if self.last_checkpoint is not None:
            summary["last_checkpoint"] = str(self.last_checkpoint)
        self.finish_summary(summary)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        self.sink.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        return RunResult(self.run_dir, final_dir, summary)


def eval_summary(evals: dict) -> dict:
    """The first and the last evaluation's accuracy per set (`eval/base`, `eval/final`); empty without one."""
    if not evals:
        return {}
    return {"eval/base": {name: r["accuracy"] for name, r in evals[min(evals)].items()},
            "eval/final": {name: r["accuracy"] for name, r in evals[max(evals)].items()}}


def print_result(result: RunResult, lines: list[str]) -> None:
    """The command's last words: where the run is, the algorithm's own `lines`, the held-out accuracy."""
    s = result.summary
    print(f"\nrun directory: {result.run_dir}")
    print(f"final policy:  {result.final_dir}")
    for line in lines:
        print(line)
    if "eval/final" in s:
        print("held-out accuracy (start -> end):")
        for name, acc in s["eval/final"].items():
            print(f"  {name:8s} {s['eval/base'].get(name, float('nan')):.3f} -> {acc:.3f}")


def launch(trainer_class: type[Trainer], cfg: Config, signals: StopSignals = stops.SIGNALS) -> RunResult:
    """The whole command: a fresh run, or the resume of the run dir's newest intact checkpoint. `signals`:
    the stop requests the run acts on (the process's signals; the controller and the trainer get it)."""
    run_dir = make_run_dir(cfg)
    resume_from = checkpoints.resolve_resume(cfg, run_dir)
    saved = None
    if resume_from is not None:
        checkpoints.check_compatible(cfg, resume_from)
        saved = checkpoints.read_state(resume_from)
        log.info("resuming from %s (step %d)", resume_from, saved["step"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    train_records, eval_sets = build_datasets(cfg.data)  # data errors surface before anything heavy starts
    log.info("%d training prompts; evaluation sets %s", len(train_records), {k: len(v) for k, v in eval_sets.items()})
    view = trainer_class.plan(cfg, train_records)
    cluster.start_ray(cfg)
    signals.reinstall()  # ray.init replaced the SIGTERM handler
    watch = watch_cluster(run_dir, trainer_class.command, signals)
    try:
        return _run(trainer_class, cfg, view, run_dir, (resume_from, saved), train_records, eval_sets, signals)
    finally:
        watch.stop()


def _run(trainer_class: type[Trainer], cfg: Config, view: Config, run_dir: Path, resume: tuple,
         train_records: list, eval_sets: dict, signals: StopSignals) -> RunResult:
    resume_from, saved = resume  # the checkpoint and its driver state, or (None, None)
    model_path = saved["model_path"] if saved else starting_policy(cfg, run_dir, train_records)
    signals.check()
    controller = Controller.start(view, model_path, faults_dir=run_dir / "faults", signals=signals)
    sink = None
    try:
        signals.check()
        sink = MetricsSink(run_dir, cfg.logging, to_dict(cfg), view.train.steps,
                           resume_step=saved["step"] if saved else None, wandb_id=saved and saved.get("wandb_id"),
                           **trainer_class.sink_options)
        trainer = trainer_class(view, controller, sink, run_dir, PromptSampler(train_records, cfg.train.seed), eval_sets,
                                to_yaml(cfg))
        if saved:
            trainer.restore(resume_from, saved)
        signals.defer()  # the loop can checkpoint now: a signal stops it at the next step boundary
        signals.check()  # one that arrived while start-up was deferred (a library caller's own install)
        return trainer.finish(trainer.loop())
    except ActorFailure as exc:
        if exc.kind == controller.learners.kind:
            controller.stop_stuck_learners(exc)
            stacks = f" (stacks in {controller.faults_dir})" if isinstance(exc, ActorTimeoutError) else ""
            raise LearnerRankLost(f"{exc}{stacks}; a learner rank cannot be replaced in place: "
                                  f"{resume_hint(run_dir, trainer_class.command)}") from exc
        raise
    finally:
        if sink is not None:
            sink.close()
        controller.stop()


def watch_cluster(run_dir: Path, command: str, signals: StopSignals) -> cluster.GcsWatch:
    """From here on, a Ray cluster that goes away (its head killed, its node lost) ends the command
    within about half a minute: one line saying so, the resume command, exit 1, none of this process's
    Ray processes left."""
    def on_lost(seconds: float) -> None:
        signame = signals.requested()
        if signame:
            # A stop is ending the run and the Ray nodes stop with it (scancel, a time limit): the step in
            # flight cannot finish, and its calls would wait for actors the lost GCS can no longer report dead.
            line = (f"medvlm-r1: stopped by {signame}; the Ray cluster stopped with it before the step ended "
                    f"({resume_hint(run_dir, command)})")
            cluster.exit_now(stops.exit_code_of(signame), last_line=line)
            return
        line = (f"medvlm-r1: lost the Ray cluster: its GCS has not answered for {seconds:.0f} s (the Ray head "
                f"or its node is gone); {resume_hint(run_dir, command)}")
        cluster.exit_now(1, last_line=line)

    return cluster.GcsWatch(on_lost, hurry=lambda: signals.requested() is not None)


def starting_policy(cfg: Config, run_dir: Path, train_records) -> str:
    """The policy's first checkpoint: the configured model, after the format warm-up when one is asked for."""
    model_path = prepare_model(cfg)
    if cfg.train.format_warmup_steps > 0:
        model_path = format_warmup(cfg, model_path, train_records, run_dir)
    return model_path


def make_run_dir(cfg: Config) -> Path:
    if cfg.logging.run_dir:
        run_dir = Path(cfg.logging.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.logging.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve()


def prepare_model(cfg: Config) -> str:
    """The policy's starting checkpoint; the tiny model is built on the fly when asked for and absent."""
    path = Path(cfg.model.path)
    if path.exists():
        return str(path)
    if cfg.model.build_tiny_if_missing:
        from medvqa.tiny_model import build_tiny_model

        log.info("building the tiny Qwen2-VL at %s", path)
        return build_tiny_model(str(path), seed=cfg.model.tiny_seed)
    return cfg.model.path  # a hub id, resolved by transformers and vLLM from the node's cache


def format_warmup(cfg: Config, model_path: str, records, run_dir: Path) -> str:
    """Supervised warm-up on the answer format only, in a Ray task so the driver stays tensor-free."""
    from learner.format_warmup import warmup_format

    out = run_dir / "warmup"
    task = ray.remote(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=cluster.actor_gpus(cfg, "learner"))(
        warmup_format)
    log.info("format warm-up: %d steps at lr %g", cfg.train.format_warmup_steps, cfg.train.format_warmup_lr)
    return ray.get(task.remote(model_path, str(out), records, cfg.train.format_warmup_steps,
                               cfg.train.format_warmup_lr, cfg.train.seed, cfg.model.min_pixels,
                               cfg.model.max_pixels))


def resume_hint(run_dir: Path, command: str) -> str:
    last = checkpoints.latest(run_dir)
    if last is None:
        return "no checkpoint was written yet (set train.checkpoint_every)"
    return f"resume from {last} with: medvlm-r1 {command} {run_dir / 'config.yaml'} logging.run_dir={run_dir}"


def evaluate_and_log(cfg: Config, controller: Controller, sink: MetricsSink, eval_sets: dict, step: int) -> dict:
    """Greedy evaluation by the rollout workers (with the weights last synced), written to eval/stepNNNNNN."""
    t0 = time.perf_counter()
    results, rows = controller.evaluate(eval_sets, cfg.rollout.max_new_tokens)
    write_outputs(sink.run_dir / "eval" / f"step{step:06d}", results, rows, {"step": step, "decoding": "greedy"})
    sink.log_row({"step": step, **eval_metrics(results), "time/eval_s": time.perf_counter() - t0})
    return results
