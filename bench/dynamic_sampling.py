"""Dynamic sampling on the demo's workload: grpo.dynamic_sampling false, then true, in one run.

configs/tiny_cpu.yaml as `make demo` runs it: the format warm-up once, then the GRPO steps without the
group filter and again, from the same warmed policy, with it. Prints per setting when the 10-step mean
of reward/accuracy (each step's first batch, an unfiltered sample of the policy) first reaches the
target (0.95): the step, the samples generated up to then and the GRPO wall time up to then; and over
the whole run the samples generated, the GRPO phase's time, the mean zero-signal fraction of the first
batches, and the held-out accuracy at the end. Writes runs/dynamic_sampling.json. Usage:
    python bench/dynamic_sampling.py [--target 0.95] [key=value ...]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlap_speed import run  # noqa: E402  (bench/ is on sys.path when run as a script)

WINDOW = 10


def reached(rows: list[dict], target: float, per_step: int) -> dict:
    """The first step whose trailing 10-step mean of reward/accuracy is >= target, and what it took
    (a step without the filter generates `per_step` samples; with it, its row says how many)."""
    generated = 0
    for i, row in enumerate(rows):
        generated += row.get("samples/generated", per_step)
        if i + 1 >= WINDOW and sum(r["reward/accuracy"] for r in rows[i + 1 - WINDOW:i + 1]) / WINDOW >= target:
            return {"step": row["step"], "samples": generated, "seconds": row["time/elapsed_s"]}
    return {"step": None, "samples": None, "seconds": None}


def main(argv: list[str]) -> None:
    from launcher.config import load_config

    target = 0.95
    if argv[:1] == ["--target"]:
        target, argv = float(argv[1]), argv[2:]
    cfg = load_config("configs/tiny_cpu.yaml", argv)
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    load = os.getloadavg()[0]
    rows0, summary0 = run(["grpo.dynamic_sampling=false", *argv])
    warmed = str(Path(summary0["run_dir"]) / "warmup")
    rows1, summary1 = run(["grpo.dynamic_sampling=true", f"model.path={warmed}", "model.build_tiny_if_missing=false",
                           "train.format_warmup_steps=0", *argv])
    out = {"target": target, "load_before": load, "load_after": os.getloadavg()[0], "settings": {}}
    for name, rows, s in (("off", rows0, summary0), ("on", rows1, summary1)):
        total = sum(r.get("samples/generated", per_step) for r in rows)
        out["settings"][name] = {
            "reached": reached(rows, target, per_step), "steps": len(rows), "samples_generated": total,
            "grpo_s": s["time/grpo_s"], "zero_signal_fraction": sum(r["groups/zero_signal_fraction"] for r in rows) / len(rows),
            "resample_rounds": sum(r.get("resample/rounds", 0) for r in rows),
            "accuracy_first_last": [s["first10/reward/accuracy"], s["last10/reward/accuracy"]],
            "eval_final": s.get("eval/final"), "run_dir": s["run_dir"]}
    Path("runs").mkdir(exist_ok=True)
    Path("runs/dynamic_sampling.json").write_text(json.dumps(out, indent=2))
    print(f"\nload average {out['load_before']:.2f} -> {out['load_after']:.2f}; target: 10-step mean reward/accuracy "
          f">= {target}")
    print(f"  {'dynamic':8s}{'reached at step':>16s}{'samples then':>14s}{'GRPO s then':>13s}"
          f"{'samples, run':>14s}{'GRPO s, run':>13s}{'zero-signal':>13s}{'acc first->last':>17s}  held-out")
    for name, r in out["settings"].items():
        hit = r["reached"]
        fmt = lambda v, f: "never" if v is None else format(v, f)  # noqa: E731
        acc = f"{r['accuracy_first_last'][0]:.2f} -> {r['accuracy_first_last'][1]:.2f}"
        held = " ".join(f"{k} {v:.2f}" for k, v in (r["eval_final"] or {}).items())
        print(f"  {name:8s}{fmt(hit['step'], 'd'):>16s}{fmt(hit['samples'], 'd'):>14s}{fmt(hit['seconds'], '.0f'):>13s}"
              f"{r['samples_generated']:14d}{r['grpo_s']:13.0f}{r['zero_signal_fraction']:13.2f}{acc:>17s}  {held}")
    off, on = out["settings"]["off"]["reached"], out["settings"]["on"]["reached"]
    if off["step"] and on["step"]:
        print(f"  to the target, off / on: steps {off['step'] / on['step']:.2f}x, samples "
              f"{off['samples'] / on['samples']:.2f}x, wall time {off['seconds'] / on['seconds']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
