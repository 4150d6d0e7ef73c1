"""medvlm-r1 against TRL's GRPOTrainer on the same work, side by side in one run.

TRL (`pip install -e ".[bench]"`, trl 1.16.0) trains in this process with Hugging Face `generate`, no Ray,
no vLLM; medvlm-r1 runs its own loop (one vLLM-CPU rollout worker, one DeepSpeed learner rank,
train.max_staleness=1). Both start from the same model folder and train on the same synthetic records
(configs/tiny_cpu.yaml's data), with the same prompt and rewards (format + accuracy, weights 1), G = 8,
8 prompts (64 samples) per optimiser step, temperature 1, top-p 1, beta 0, the same maximum completion
length, learning rate, micro-batches of 16, fp32, no gradient checkpointing, the paper's loss aggregation
(TRL's loss_type="grpo"). Threads: each system gets the whole machine, one torch thread per core it runs
on: TRL's single process torch.set_num_threads(<cores>); each medvlm-r1 actor is pinned to one core of its
own with one thread (cluster.pin_cpus).

Workloads: (a) the tiny model (hidden 128, 2 layers) at 48 new tokens; (b) a Qwen2-VL of about 12M
parameters (hidden 384, 6 layers, 6 heads, MLP 1152, the tiny model's tokenizer) at 128 new tokens.
Steady state leaves out the first steps (engine and allocator warm-up). Usage:
    python bench/vs_trl.py [a|b ...] [--steps N] [--skip K]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = {
    "a": {"hidden": 128, "layers": 2, "intermediate": None, "max_new_tokens": 48, "steps": 30, "skip": 5},
    "b": {"hidden": 384, "layers": 6, "intermediate": 1152, "max_new_tokens": 128, "steps": 10, "skip": 3},
}


def our_config(model_dir: str, run_dir: str, max_new_tokens: int, steps: int, extra: list[str]):
    from launcher.config import load_config

    return load_config("configs/tiny_cpu.yaml", [
        f"model.path={model_dir}", "model.build_tiny_if_missing=false", f"logging.run_dir={run_dir}",
        "train.format_warmup_steps=0", f"train.steps={steps}", "train.eval_at_end=false", "train.checkpoint_every=0",
        "train.max_staleness=1", f"rollout.max_new_tokens={max_new_tokens}", "learner.micro_batch_size=16",
        "logging.wandb=false", "logging.progress_bar=false", "logging.sample_every=0", "cluster.pin_cpus=true",
        *extra])


def steady(stamps: list[float], tokens: list[int], samples_per_step: int, skip: int) -> dict:
    """Samples/s and completion tokens/s from step-end times, leaving out the first `skip` steps."""
    span = stamps[-1] - stamps[skip - 1] if skip else stamps[-1]
    steps = len(stamps) - skip
    return {"step_s": span / steps, "samples_per_s": samples_per_step * steps / span,
            "tokens_per_s": sum(tokens[skip:]) / span}


def run_ours(model_dir: str, max_new_tokens: int, steps: int, extra: list[str]) -> tuple[list, list, dict]:
    import ray

    from launcher.train_loop import run_training

    cfg = our_config(model_dir, tempfile.mkdtemp(prefix="bench-ours-"), max_new_tokens, steps, extra)
    try:
        result = run_training(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl") if "reward/total" in line]
    tokens = [round(r["response_length/mean"] * cfg.rollout.prompts_per_step * cfg.rollout.group_size) for r in rows]
    mean = lambda key: sum(r[key] for r in rows[2:]) / len(rows[2:])  # noqa: E731
    phases = {k: mean(f"time/{k}_s") for k in ("rollout", "train", "sync", "step")}
    return [r["time/elapsed_s"] for r in rows], tokens, phases


def trl_dataset(records):
    from datasets import Dataset

    from medvqa.prompt import chat_messages

    return Dataset.from_list([{"prompt": chat_messages(r), "image": r.load_image(), "answer": r.answer,
                               "options": json.dumps(r.options)} for r in records])


def trl_rewards(weights: dict) -> list:
    """One TRL reward function per reward of ours: the same functions of the decoded text."""
    from rewards import get_reward

    def make(name):
        fn = get_reward(name)

        def reward(completions, answer, options, **_):
            return [fn(c[0]["content"], a, json.loads(o)) for c, a, o in zip(completions, answer, options)]
        reward.__name__ = name
        return reward

    return [make(name) for name in weights]


def run_trl(model_dir: str, cfg, steps: int) -> tuple[list, list]:
    import torch
    from transformers import PrinterCallback, Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from launcher.data import build_datasets
    from medvqa.prompt import load_processor

    torch.set_num_threads(os.cpu_count())
    stamps, tokens = [], []

    class StepClock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                stamps.append(time.perf_counter())
                tokens.append(round(logs["completions/mean_length"] * samples))

    r, lr = cfg.rollout, cfg.learner
    samples = r.prompts_per_step * r.group_size
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps, seed=cfg.train.seed,
        per_device_train_batch_size=lr.micro_batch_size, gradient_accumulation_steps=samples // lr.micro_batch_size,
        num_generations=r.group_size, max_completion_length=r.max_new_tokens, temperature=r.temperature,
        top_p=r.top_p, beta=cfg.grpo.beta, epsilon=cfg.grpo.clip_low, loss_type="grpo", scale_rewards="group",
        learning_rate=lr.lr, lr_scheduler_type="constant", weight_decay=lr.weight_decay, max_grad_norm=lr.grad_clip,
        adam_beta1=lr.betas[0], adam_beta2=lr.betas[1], bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_level="warning")
    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=trl_rewards(cfg.rewards.weights), args=args,
        train_dataset=trl_dataset(build_datasets(cfg.data)[0]),
        processing_class=load_processor(model_dir, cfg.model.min_pixels, cfg.model.max_pixels),
        callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # a dict printed per step otherwise
    trainer.train()
    return [s - t0 for s in stamps], tokens


def measure(name: str, steps: int, skip: int, extra: list[str]) -> None:
    from medvqa.tiny_model import build_tiny_model

    w = WORKLOADS[name]
    model_dir = build_tiny_model(tempfile.mkdtemp(prefix=f"bench-model-{name}-"), seed=0, hidden=w["hidden"],
                                 layers=w["layers"], intermediate=w["intermediate"])
    cfg = our_config(model_dir, "unused", w["max_new_tokens"], steps, extra)
    samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    load = os.getloadavg()[0]
    trl = steady(*run_trl(model_dir, cfg, steps), samples, skip)
    stamps, tokens, phases = run_ours(model_dir, w["max_new_tokens"], steps, extra)
    ours = steady(stamps, tokens, samples, skip)
    print(f"\n({name}) hidden {w['hidden']}, {w['layers']} layers, {_params(model_dir) / 1e6:.1f}M parameters, "
          f"{w['max_new_tokens']} new tokens; {steps} steps each, first {skip} left out; "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for label, m in (("TRL GRPOTrainer", trl), ("medvlm-r1", ours)):
        print(f"  {label:16s} {m['step_s']:7.2f} s/step {m['samples_per_s']:8.1f} samples/s "
              f"{m['tokens_per_s']:9.0f} completion tokens/s")
    print(f"  medvlm-r1 / TRL: {ours['samples_per_s'] / trl['samples_per_s']:.2f}x samples/s, "
          f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s")
    print(f"  medvlm-r1 phases (mean s): generate {phases['rollout']:.2f} (engine), train {phases['train']:.2f}, "
          f"sync {phases['sync']:.3f}, step {phases['step']:.2f} "
          f"= {phases['step'] / max(phases['rollout'], phases['train']):.2f} x max(generate, train)")


def _params(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="*", default=["a", "b"], choices=sorted(WORKLOADS))
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per system (default: per workload)")
    p.add_argument("--skip", type=int, default=None, help="first steps left out of the steady state")
    p.add_argument("--set", nargs="*", default=[], help="medvlm-r1 config overrides (key=value)")
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench/vs_trl.py needs TRL: pip install -e '.[bench]' (trl==1.16.0)")
    for name in args.workloads:
        w = WORKLOADS[name]
        measure(name, args.steps or w["steps"], w["skip"] if args.skip is None else args.skip, args.set)


if __name__ == "__main__":
    main(sys.argv[1:])
