"""How much the learning run's verdict depends on the seed and on the float path, measured the test's way.

tests/commands/test_learning_run.py asserts that reward/accuracy rises by MARGIN from the first to the last 10 of
its 50 steps. A trajectory depends on the seed and, through the order of float sums, on the machine. This
runs the test's very config (its `learning_config`, from the same format-warmed tiny model that
tests/conftest.py builds) under several `train.seed` values, once as the test runs it and once with
`learner.micro_batch_size=8` (the same maths, other sums), and once more with a learning rate of 1e-12, a
policy that cannot learn: its "rise" is what sampling noise alone gives, the figure the margin must stand
above. Prints each run's first and last windows and the rise. Extra `key=value` arguments go to every run.
Usage:
    python bench/learning_spread.py [--seeds 0,1,2,3,4] [key=value ...]

Measured on a 2-core Xeon (AVX-512), nothing else training, first -> last 10-step mean of reward/accuracy:
    as tested, seeds 0-7:     0.467->0.970  0.528->0.970  0.484->0.906  0.434->0.956  0.467->0.980
                              0.502->0.983  0.484->0.927  0.505->0.973        (smallest rise +0.422)
    micro-batch 8, seeds 0-4: the same windows to three digits (the sums differ; no verdict moved)
    no learning, seeds 0-4:   rises -0.035, -0.001, -0.006, -0.014, 0.000  (|noise| <= 0.035)
Writes every curve to runs/learning_spread.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "commands")]

FLOAT_PATHS = {"as tested": [], "micro-batch 8": ["learner.micro_batch_size=8"]}
CONTROL = ["learner.lr=1e-12"]  # the same sampling, no learning (the config asks for a positive rate)


def warm_model(folder: Path) -> str:
    """The session's format-warmed tiny model of tests/conftest.py, built once into `folder`."""
    import conftest
    from learner.format_warmup import warmup_format
    from medvqa.tiny_model import build_tiny_model

    warm = folder / "warm"
    if not (warm / "config.json").exists():
        tiny = build_tiny_model(str(folder / "tiny"), seed=0)
        warmup_format(tiny, str(warm), conftest.warmup_records(), conftest.WARMUP_STEPS, conftest.WARMUP_LR, 0,
                      conftest.WARMUP_PIXELS, conftest.WARMUP_PIXELS)
    return str(warm)


def accuracy_curve(model: str, overrides: list[str]) -> list[float]:
    import ray

    from launcher.train_loop import run_training
    from test_learning_run import learning_config

    run_dir = Path(tempfile.mkdtemp(prefix="learning-spread-"))
    cfg = learning_config(model, run_dir, "train.eval_at_end=false", "train.eval_every=0", "train.save_every=0",
                          "logging.wandb=false", *overrides)
    try:
        run_training(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["reward/accuracy"] for r in rows if "reward/total" in r]


def windows(acc: list[float], window: int) -> dict:
    first, last = sum(acc[:window]) / window, sum(acc[-window:]) / window
    return {"first": first, "last": last, "rise": last - first}


def main() -> int:
    from test_learning_run import MARGIN, WINDOW

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.chdir(ROOT)  # the test's config names configs/ relative to the repository
    model = warm_model(Path(tempfile.gettempdir()) / "medvlm-learning-spread")
    results = []
    for name, path_overrides in [*FLOAT_PATHS.items(), ("no learning", CONTROL)]:
        for seed in (int(s) for s in args.seeds.split(",")):
            acc = accuracy_curve(model, [f"train.seed={seed}", *path_overrides, *args.overrides])
            results.append({"run": name, "seed": seed, **windows(acc, WINDOW), "curve": acc})
            print(f"{name:14s} seed {seed}: {results[-1]['first']:.3f} -> {results[-1]['last']:.3f} "
                  f"(rise {results[-1]['rise']:+.3f})", flush=True)
    learned = [r["rise"] for r in results if r["run"] != "no learning"]
    noise = [abs(r["rise"]) for r in results if r["run"] == "no learning"]
    print(f"smallest rise {min(learned):.3f}, largest |rise| without learning {max(noise):.3f}; "
          f"the test asks a rise of {MARGIN}")
    out = Path("runs/learning_spread.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written to {out}")
    return 0 if min(learned) >= MARGIN > max(noise) else 1


if __name__ == "__main__":
    sys.exit(main())
