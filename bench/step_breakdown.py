"""Where the tiny run's step time goes: generation, training, weight sync, and waiting.

Runs the embedded default for a few steps and prints each phase as a share of the measured step time,
so the numbers compare across machines. "training" is the learner's own compute (`time/learner_s`,
timed inside the rank); "waiting" is the rest of the driver's training phase (shipping the batch to
the ranks, waiting for the slowest one) plus whatever of the step no phase accounts for. Usage:
    python bench/step_breakdown.py [key=value ...]      (default: configs/tiny_cpu.yaml, 12 steps)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = (("generation", "time/generate_s"), ("training", "time/learner_s"), ("weight sync", "time/sync_s"))


def breakdown(rows: list[dict], skip: int = 2) -> dict[str, float]:
    """Share of total step time per phase; the first `skip` steps (warm caches, lazy init) are left out."""
    rows = rows[skip:] if len(rows) > skip else rows
    total = sum(r["time/step_s"] for r in rows)
    shares = {name: sum(r[key] for r in rows) / total for name, key in PHASES}
    shares["waiting"] = 1.0 - sum(shares.values())
    shares["step_s_mean"] = total / len(rows)
    return shares


def main(argv: list[str]) -> None:
    from launcher.config import load_config
    from launcher.train_loop import run_training

    run_dir = tempfile.mkdtemp(prefix="bench-step-")
    overrides = ["train.steps=12", "train.eval_at_end=false", "logging.wandb=false", "logging.progress_bar=false",
                 f"logging.run_dir={run_dir}", *argv]
    result = run_training(load_config("configs/tiny_cpu.yaml", overrides))
    rows = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl") if "reward/total" in line]
    shares = breakdown(rows)
    print(f"\nstep time breakdown over {len(rows) - 2} steps (mean step {shares.pop('step_s_mean'):.2f} s):")
    for name, share in shares.items():
        print(f"  {name:12s} {100 * share:6.1f} % of step time")


if __name__ == "__main__":
    main(sys.argv[1:])
