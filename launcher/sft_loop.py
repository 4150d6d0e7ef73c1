"""`medvlm-r1 sft`: the supervised baseline of the paper's comparison, on everything GRPO uses.

Only the objective differs from `train`: the training records (data section, subset, seed and the
order they are drawn in), the starting checkpoint (after the format warm-up when one is
configured), the DeepSpeed learner ranks and their ZeRO settings, the run directory, the
evaluation (greedy, by rollout workers that receive the learner's weights), full checkpoints and
resume (train.checkpoint_every, train.resume), clean stops, the non-finite guard and the summary are
the same code (launcher/trainer.py). SFT supplies its step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

from launcher.config import Config
from launcher.metrics import SFT_STEP_KEYS
from launcher.trainer import RunResult, Trainer, eval_summary, launch, print_result

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
    return launch(SFTTrainer, cfg)


class SFTTrainer(Trainer):
    """Cross-entropy on the target text of sft.batch_size records per step; the rollout workers get the
    learner's weights before each evaluation."""

    method, command, step_row_key = "sft", "sft", "epoch"
    sink_options = {"step_keys": SFT_STEP_KEYS, "desc": "sft", "bar_keys": (("loss", "loss"),)}

    @classmethod
    def plan(cls, cfg: Config, train_records: list) -> Config:
        steps = sft_steps(cfg, len(train_records))
        log.info("SFT: %d steps of %d records (target %s, lr %g)", steps, cfg.sft.batch_size, cfg.sft.target,
                 cfg.sft.lr)
        return learner_view(cfg, steps)

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        records = self.sampler.draw(cfg.sft.batch_size)
        stats = self.controller.train_sft(records, cfg.sft.target)
        elapsed = time.perf_counter() - t0
        s = stats[0]  # every rank returns the step's numbers over all ranks
        return {"step": self.step, "epoch": self.sampler.epoch + self.sampler.position / len(self.sampler.records),
                "loss": s["loss"], "lr": s["lr"], "grad_norm": s["grad_norm"], "num_tokens": s["num_tokens"],
                "time/learner_s": max(x["time/learner_s"] for x in stats), "time/step_s": elapsed,
                "throughput/tokens_per_s": s["num_tokens"] / elapsed}

    def before_evaluation(self) -> None:
        """The rollout workers evaluate: they need the learner's weights first."""
        if self.step > 0:
            self.version += 1
            self.controller.sync(self.version)

    def summarize(self) -> dict:
        cfg, history = self.cfg, self.history
        window = max(1, min(10, len(history) // 2))
        mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)  # noqa: E731
        return {"method": self.method, "target": cfg.sft.target, "steps": len(history),
                "epochs": history[-1]["epoch"], f"first{window}/loss": mean(history[:window]),
                f"last{window}/loss": mean(history[-window:]), **eval_summary(self.evals)}


def print_summary(result: RunResult) -> None:
    s = result.summary
    first = next(v for k, v in s.items() if k.startswith("first") and k.endswith("/loss"))
    last = next(v for k, v in s.items() if k.startswith("last") and k.endswith("/loss"))
    print_result(result, [f"sft loss ({s['target']}) first steps {first:.4f} -> last steps {last:.4f} over "
                          f"{s['epochs']:.2f} epochs"])
