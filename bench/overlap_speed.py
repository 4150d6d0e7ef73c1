"""Generation overlapped with training on the demo's workload: train.max_staleness 0, then 1, in one run.

configs/tiny_cpu.yaml as `make demo` runs it (the learner and the rollout engine pinned to a core each):
the 150-step format warm-up once, then the 200 GRPO steps with
max_staleness=0 and again, from the same warmed policy, with max_staleness=1. Prints per setting the
mean step time and its phases (generate: the engine's own time per batch; train: the learner call;
sync), the GRPO phase's wall time, the ratios, and with 1 the step time over max(generate, train),
which is 1.0 for a perfect overlap, and each setting's learning: reward/accuracy of the first and last 10
steps and the held-out MRI accuracy at the end (evaluations lie outside the GRPO phase's time). The first steps (warm caches) are left out of the means. Usage:
    python bench/overlap_speed.py [key=value ...]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKIP = 5


def run(overrides: list[str]) -> tuple[list[dict], dict]:
    import ray

    from launcher.config import load_config
    from launcher.train_loop import run_training

    base = ["logging.progress_bar=false", f"logging.run_dir={tempfile.mkdtemp(prefix='bench-')}"]
    try:
        result = run_training(load_config("configs/tiny_cpu.yaml", base + overrides))
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl") if "reward/total" in line]
    return rows, {**result.summary, "run_dir": str(result.run_dir)}


def phases(rows: list[dict]) -> dict:
    rows = rows[SKIP:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"step": mean("time/step_s"), "generate": mean("time/rollout_s"), "train": mean("time/train_s"),
            "sync": mean("time/sync_s")}


def main(argv: list[str]) -> None:
    load = os.getloadavg()[0]
    rows0, summary0 = run(["train.max_staleness=0", *argv])
    warmed = str(Path(summary0["run_dir"]) / "warmup")
    rows1, summary1 = run(["train.max_staleness=1", f"model.path={warmed}", "model.build_tiny_if_missing=false",
                           "train.format_warmup_steps=0", *argv])
    p0, p1 = phases(rows0), phases(rows1)
    print(f"\n{len(rows0)} GRPO steps per setting (means leave out the first {SKIP}); "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"  {'max_staleness':14s}{'step s':>9s}{'generate s':>12s}{'train s':>10s}{'sync s':>9s}"
          f"{'GRPO phase s':>14s}{'accuracy first->last':>23s}{'held-out MRI':>14s}")
    for k, p, s in ((0, p0, summary0), (1, p1, summary1)):
        acc = f"{s['first10/reward/accuracy']:.2f} -> {s['last10/reward/accuracy']:.2f}"
        print(f"  {k:<14d}{p['step']:9.3f}{p['generate']:12.3f}{p['train']:10.3f}{p['sync']:9.3f}"
              f"{s['time/grpo_s']:14.1f}{acc:>23s}{s['eval/final']['MRI']:14.2f}")
    print(f"  mean step time, 0 / 1:  {p0['step'] / p1['step']:.2f}x")
    print(f"  GRPO phase, 0 / 1:      {summary0['time/grpo_s'] / summary1['time/grpo_s']:.2f}x")
    print(f"  with 1, step / max(generate, train): {p1['step'] / max(p1['generate'], p1['train']):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
