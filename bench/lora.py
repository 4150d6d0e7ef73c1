"""LoRA against full fine-tuning on tests/commands/test_learning_run.py's setting: learning, sync/bytes, learner memory.

Each run is the learning test's config (`learning_config`: 50 steps, seed 0, `learner.mu=2`, weights pushed every
2 steps, beta 0.04, from the format-warmed tiny model of tests/conftest.py, built once into runs/chaos/model/ as
bench/chaos.py does), without evaluation, saves or W&B, under a memory sampler (bench/proc_memory.py). Per run:
reward/accuracy of the first and last 10 steps and the rise, `sync/bytes`, the learner rank's peak RSS (its
process, the whole run) and the mean step time. One run at a time, one line each; results to runs/lora_bench.json.
Usage:
    python bench/lora.py                                   # full fine-tuning, then LoRA r=8 at lr 1e-3, 5e-3, 1e-2
    python bench/lora.py --runs "lora lr 5e-3=model.lora_rank=8 learner.lr=5e-3"   # label=overrides, ';' between
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "commands"), str(ROOT / "bench")]

from proc_memory import GIB, TreeMemorySampler  # noqa: E402

DEFAULT_RUNS = ("full=;lora r8 lr 1e-3=model.lora_rank=8 learner.lr=1e-3;"
                "lora r8 lr 5e-3=model.lora_rank=8 learner.lr=5e-3;lora r8 lr 1e-2=model.lora_rank=8 learner.lr=1e-2")


def one_run(model: str, overrides: list[str]) -> dict:
    import ray

    from launcher.train_loop import run_training
    from test_learning_run import WINDOW, learning_config

    run_dir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    cfg = learning_config(model, run_dir, "train.eval_at_end=false", "train.eval_every=0", "train.save_every=0",
                          "logging.wandb=false", *overrides)
    with TreeMemorySampler() as sampler:
        try:
            run_training(cfg)
        finally:
            ray.shutdown()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if "reward/total" in r]
    acc = [r["reward/accuracy"] for r in steps]
    first, last = sum(acc[:WINDOW]) / WINDOW, sum(acc[-WINDOW:]) / WINDOW
    learner = [p for p in sampler.peaks.values() if p.ray_class() == "LearnerRank"]
    return {"overrides": overrides, "first": first, "last": last, "rise": last - first,
            "sync_bytes": max(r.get("sync/bytes", 0) for r in steps),
            "learner_peak_rss_mib": max(p.rss for p in learner) / 2**20 if learner else None,
            "step_s": sum(r["time/step_s"] for r in steps) / len(steps), "accuracy": acc, "run_dir": str(run_dir)}


def main() -> int:
    from chaos import warm_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="label=overrides (space-separated), ';' between runs")
    args = parser.parse_args()
    model, results = warm_model(), {}
    for item in args.runs.split(";"):
        label, _, overrides = item.partition("=")
        res = results[label] = one_run(model, overrides.split())
        print(f"{label:20s} accuracy {res['first']:.2f} -> {res['last']:.2f} (rise {res['rise']:+.2f})  "
              f"sync/bytes {res['sync_bytes']:,}  learner peak RSS {res['learner_peak_rss_mib']:.0f} MiB  "
              f"step {res['step_s']:.2f} s", flush=True)
    out = ROOT / "runs" / "lora_bench.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}; peak RSS of the learner in GiB: "
          + ", ".join(f"{k} {v['learner_peak_rss_mib'] * 2**20 / GIB:.2f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
