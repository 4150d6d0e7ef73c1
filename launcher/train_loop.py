"""`medvlm-r1 train`: the GRPO loop from start to the saved policy and its summary."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path


from launcher import cluster, driver
from launcher.config import Config, to_dict, to_yaml
from launcher.data import PromptSampler, build_datasets
from launcher.evaluate import eval_metrics, evaluate_sets, write_outputs
from launcher.metrics import MetricsSink

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    summary: dict


def run_training(cfg: Config) -> RunResult:
    run_dir = driver.make_run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    cluster.start_ray(cfg)
    train_records, eval_sets = build_datasets(cfg.data)
    log.info("%d training prompts; evaluation sets %s", len(train_records), {k: len(v) for k, v in eval_sets.items()})
    model_path = driver.prepare_model(cfg)
    if cfg.train.format_warmup_steps > 0:
        model_path = driver.format_warmup(cfg, model_path, train_records, run_dir)
    actors = driver.start_actors(cfg, model_path)
    sink = MetricsSink(run_dir, cfg.logging, to_dict(cfg), cfg.train.steps)
    try:
        summary = _loop(cfg, actors, sink, train_records, eval_sets)
        final_dir = run_dir / "final"
        driver.save_policy(actors, final_dir)
        summary["final_dir"] = str(final_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        sink.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        return RunResult(run_dir, final_dir, summary)
    finally:
        sink.close()
        driver.stop_actors(actors)


def _loop(cfg: Config, actors, sink: MetricsSink, train_records, eval_sets) -> dict:
    sampler = PromptSampler(train_records, cfg.train.seed)
    version, history, evals = 0, [], {}
    if eval_sets and (cfg.train.eval_at_end or cfg.train.eval_every):
        evals[0] = _evaluate(cfg, actors, sink, eval_sets, step=0)
    for step in range(1, cfg.train.steps + 1):
        row, batch, records = _step(cfg, actors, sampler, step, version)
        version = row["weight_version"]
        history.append(row)
        sink.log_step(row)
        if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == 1):
            sink.log_samples(step, driver.sample_rows(batch, records, cfg.logging.num_samples_logged))
        if eval_sets and cfg.train.eval_every and step % cfg.train.eval_every == 0:
            evals[step] = _evaluate(cfg, actors, sink, eval_sets, step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
            # A Hugging Face policy checkpoint (loadable by `medvlm-r1 eval`); optimiser state is not kept.
            driver.save_policy(actors, sink.run_dir / f"checkpoint-{step:06d}")
    last = cfg.train.steps
    if eval_sets and cfg.train.eval_at_end and last not in evals:
        evals[last] = _evaluate(cfg, actors, sink, eval_sets, last)
    return _summarize(history, evals)


def _step(cfg: Config, actors, sampler: PromptSampler, step: int, version: int):
    t0 = time.perf_counter()
    records = sampler.draw(cfg.rollout.prompts_per_step)
    batch = driver.generate(actors, records, seed=cfg.train.seed * 100_003 + step * 1009)
    t1 = time.perf_counter()
    stats = driver.train(actors, batch, records)
    t2 = time.perf_counter()
    if step % cfg.learner.sync_every == 0:
        version += 1
        driver.sync_weights(actors, version)
    t3 = time.perf_counter()
    tokens = sum(len(c) for c in batch.completion_token_ids)
    row = {"step": step, **driver.rollout_metrics(batch), **stats, "weight_version": version,
           "rollout_weight_version": batch.weight_version,
           "time/generate_s": t1 - t0, "time/train_s": t2 - t1, "time/sync_s": t3 - t2, "time/step_s": t3 - t0,
           "throughput/tokens_per_s": tokens / (t3 - t0)}
    return row, batch, records


def _evaluate(cfg: Config, actors, sink: MetricsSink, eval_sets: dict, step: int) -> dict:
    t0 = time.perf_counter()
    results, rows = evaluate_sets(actors.workers, eval_sets, cfg.rollout.max_new_tokens)
    write_outputs(sink.run_dir / "eval" / f"step{step:06d}", results, rows, {"step": step, "decoding": "greedy"})
    row = {"step": step, **eval_metrics(results), "time/eval_s": time.perf_counter() - t0}
    sink.log_row(row)
    return results


def _summarize(history: list[dict], evals: dict) -> dict:
    window = max(1, min(10, len(history) // 2)) if history else 0
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows) if rows else float("nan")  # noqa: E731
    out = {"steps": len(history)}
    for key in ("reward/accuracy", "reward/format", "reward/total"):
        out[f"first{window}/{key}"] = mean(history[:window], key)
        out[f"last{window}/{key}"] = mean(history[-window:], key)
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
        if first is not None:
            print(f"{key:18s} first steps {first:.3f} -> last steps {last:.3f}")
    if "eval/final" in s:
        print("held-out accuracy (start -> end):")
        for name, acc in s["eval/final"].items():
            print(f"  {name:8s} {s['eval/base'].get(name, float('nan')):.3f} -> {acc:.3f}")
