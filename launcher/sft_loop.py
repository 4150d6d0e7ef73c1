"""`medvlm-r1 sft`: the supervised baseline of the paper's comparison, on everything GRPO uses.

Only the objective differs from `train`: the training records (data section, subset, seed and the
order they are drawn in), the starting checkpoint (after the format warm-up when one is
configured), the DeepSpeed learner ranks and their ZeRO settings, the run directory and the
evaluation (greedy, by rollout workers that receive the learner's weights) are the same code.
An SFT run writes no full checkpoints and does not resume (train.checkpoint_every and train.resume
are for `train`); it saves final/ and, with train.save_every, Hugging Face policies on the way.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

from launcher import cluster, driver, stops
from launcher.config import Config, to_dict, to_yaml
from launcher.data import PromptSampler, build_datasets
from launcher.metrics import SFT_STEP_KEYS, MetricsSink
from launcher.train_loop import RunResult, evaluate_and_log, starting_policy, watch_cluster

log = logging.getLogger(__name__)


def sft_steps(cfg: Config, num_records: int) -> int:
    """sft.steps, or enough steps of sft.batch_size records for sft.epochs passes over the records."""
    if cfg.sft.steps is not None:
        return cfg.sft.steps
    return math.ceil(cfg.sft.epochs * num_records / cfg.sft.batch_size)


def learner_view(cfg: Config, steps: int) -> Config:
    """The config the learner ranks and rollout workers are built from.

    The learner sizes its DeepSpeed batch from rollout.prompts_per_step x group_size samples and its
    schedule from train.steps; an SFT run is `steps` steps over sft.batch_size records at sft.lr,
    and has no KL term, hence no frozen reference (grpo.beta 0).
    """
    return dataclasses.replace(
        cfg, learner=dataclasses.replace(cfg.learner, lr=cfg.sft.lr, mu=1),
        rollout=dataclasses.replace(cfg.rollout, prompts_per_step=cfg.sft.batch_size, group_size=1),
        grpo=dataclasses.replace(cfg.grpo, beta=0.0), train=dataclasses.replace(cfg.train, steps=steps))


def run_sft(cfg: Config) -> RunResult:
    run_dir = driver.make_run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    train_records, eval_sets = build_datasets(cfg.data)
    steps = sft_steps(cfg, len(train_records))
    log.info("SFT: %d steps of %d records (target %s, lr %g)", steps, cfg.sft.batch_size, cfg.sft.target, cfg.sft.lr)
    if cfg.train.checkpoint_every:
        log.warning("train.checkpoint_every=%d is ignored: an SFT run writes no full checkpoints (only final/ "
                    "and train.save_every policies)", cfg.train.checkpoint_every)
    cluster.start_ray(cfg)
    stops.reinstall()  # ray.init replaced the SIGTERM handler
    watch = watch_cluster(run_dir)
    view = learner_view(cfg, steps)
    sink = actors = None
    try:
        actors = driver.start_actors(view, starting_policy(cfg, run_dir, train_records))
        actors.faults_dir = run_dir / "faults"
        sink = MetricsSink(run_dir, cfg.logging, to_dict(cfg), steps, step_keys=SFT_STEP_KEYS, desc="sft",
                           bar_keys=(("loss", "loss"),))
        return _finish(actors, sink, _loop(view, actors, sink, train_records, eval_sets))
    finally:
        if sink is not None:
            sink.close()
        if actors is not None:
            driver.stop_actors(actors)
        watch.stop()


def _finish(actors: driver.Actors, sink: MetricsSink, summary: dict) -> RunResult:
    final_dir = sink.run_dir / "final"
    driver.save_policy(actors, final_dir)
    summary["final_dir"] = str(final_dir)
    (sink.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    sink.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return RunResult(sink.run_dir, final_dir, summary)


def _loop(cfg: Config, actors, sink: MetricsSink, train_records: list, eval_sets: dict) -> dict:
    """cfg is the learner view: cfg.train.steps is the SFT step count."""
    sampler = PromptSampler(train_records, cfg.train.seed)
    steps, version, history, evals = cfg.train.steps, 0, [], {}
    if eval_sets and (cfg.train.eval_at_end or cfg.train.eval_every):
        evals[0] = evaluate_and_log(cfg, actors, sink, eval_sets, step=0)
    for step in range(1, steps + 1):
        row = _step(cfg, actors, sampler, step)
        history.append(row)
        sink.log_step(row)
        due = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
        if eval_sets and (due or (step == steps and cfg.train.eval_at_end)):
            # The rollout workers evaluate: they need the learner's weights first.
            version += 1
            driver.sync_weights(actors, version)
            evals[step] = evaluate_and_log(cfg, actors, sink, eval_sets, step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < steps:
            driver.save_policy(actors, sink.run_dir / f"checkpoint-{step:06d}")
    return _summarize(cfg, history, evals)


def _step(cfg: Config, actors, sampler: PromptSampler, step: int) -> dict:
    t0 = time.perf_counter()
    records = sampler.draw(cfg.sft.batch_size)
    world = len(actors.learners)
    calls = actors.learners.submit_each("train_sft", [(records[r::world], cfg.sft.target) for r in range(world)])
    stats = driver.wait_naming_the_late(calls, "training (sft)", driver.learner_timeout(cfg, -(-len(records) // world)))
    elapsed = time.perf_counter() - t0
    s = stats[0]  # every rank returns the step's numbers over all ranks
    return {"step": step, "epoch": sampler.epoch + sampler.position / len(sampler.records),
            "loss": s["loss"], "lr": s["lr"], "grad_norm": s["grad_norm"], "num_tokens": s["num_tokens"],
            "time/learner_s": max(x["time/learner_s"] for x in stats), "time/step_s": elapsed,
            "throughput/tokens_per_s": s["num_tokens"] / elapsed}


def _summarize(cfg: Config, history: list[dict], evals: dict) -> dict:
    window = max(1, min(10, len(history) // 2))
    mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
    out = {"method": "sft", "target": cfg.sft.target, "steps": len(history), "epochs": history[-1]["epoch"],
           f"first{window}/loss": mean(history[:window]), f"last{window}/loss": mean(history[-window:])}
    if evals:
        out["eval/base"] = {name: r["accuracy"] for name, r in evals[min(evals)].items()}
        out["eval/final"] = {name: r["accuracy"] for name, r in evals[max(evals)].items()}
    return out


def print_summary(result: RunResult) -> None:
    s = result.summary
    print(f"\nrun directory: {result.run_dir}")
    print(f"final policy:  {result.final_dir}")
    first = next(v for k, v in s.items() if k.startswith("first") and k.endswith("/loss"))
    last = next(v for k, v in s.items() if k.startswith("last") and k.endswith("/loss"))
    print(f"sft loss ({s['target']}) first steps {first:.4f} -> last steps {last:.4f} over {s['epochs']:.2f} epochs")
    if "eval/final" in s:
        print("held-out accuracy (start -> end):")
        for name, acc in s["eval/final"].items():
            print(f"  {name:8s} {s['eval/base'].get(name, float('nan')):.3f} -> {acc:.3f}")
