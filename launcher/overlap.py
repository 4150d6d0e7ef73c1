"""Generation ahead of training, bounded by `train.max_staleness` (k).

Step n trains on rollout batch n. With k = 0 batch n is sent to the rollout workers at step n and
waited for at once: generate, train, sync in turn, strictly on-policy. With k >= 1, batches up to
n + k are sent before the learner trains on batch n, so the workers sample while the learner trains.

A worker runs its calls in the order they were sent, and each step's weight update is sent after that
step's generation calls: a worker takes new weights between two requests, never during one, and every
batch records the version it was sampled with. The bound: batch m is sent at step m - k at the
earliest, before that step's update, so it is sampled with the version of step m - k - 1 or newer; it
is trained at step m on the version of step m - 1: at most k versions later (fewer with
learner.sync_every > 1, where versions advance every few steps).

Checkpoints: nothing is sent beyond the next scheduled checkpoint step (`train.checkpoint_every`, and
the last step), so the pipeline is drained when a scheduled checkpoint is written and a resumed run
continues exactly as an uninterrupted one. A checkpoint written at any other step (a stop signal)
stores the prompt sampler as it was before the batches in flight were drawn: those batches are
discarded, and the resumed run draws and samples them again, with the same records and seeds, from the
checkpoint's weights.
"""
from __future__ import annotations

import collections
import dataclasses

from launcher.config import Config
from launcher.controller import Controller, PendingRollout
from launcher.data import PromptSampler
from launcher.dynamic_sampling import keep_signal, zero_signal_fraction
from protocol.batch import RolloutBatch


def step_seed(cfg: Config, step: int) -> int:
    """The sampling seed of step `step`'s rollout batch, whenever it is sent."""
    return cfg.train.seed * 100_003 + step * 1009


def drain_step(cfg: Config, step: int) -> int:
    """The last step whose batch may be sent at step `step`: the next scheduled checkpoint or the end."""
    every, last = cfg.train.checkpoint_every, cfg.train.steps
    if every:
        return min(last, -(-step // every) * every)
    return last


def resample_seed(cfg: Config, step: int, round_: int) -> int:
    """The sampling seed of dynamic sampling's round `round_` (1, 2, ...) at step `step`."""
    return step_seed(cfg, step) + 104_729 * round_


@dataclasses.dataclass
class Taken:
    batch: RolloutBatch  # what the step trains on
    records: list  # its prompts' records
    sampled: RolloutBatch  # the step's first batch as sampled (its reward metrics are the step's)
    stats: dict  # groups/zero_signal_fraction of the first batch; with dynamic sampling, resample/*


@dataclasses.dataclass
class _Sent:
    step: int
    sampler_state: dict  # the sampler before this batch was drawn
    rollout: PendingRollout


class RolloutQueue:
    """The rollout batches sent to the workers and not yet trained on, oldest first."""

    def __init__(self, cfg: Config, sampler: PromptSampler, controller: Controller, done_steps: int = 0):
        self.cfg, self.sampler, self.controller = cfg, sampler, controller
        self.sent: collections.deque[_Sent] = collections.deque()
        self.next_step = done_steps + 1  # the next batch to draw and send

    def send_ahead(self, step: int) -> None:
        """Send every batch from the next unsent one up to step + max_staleness (within the drain bound)."""
        last = min(step + self.cfg.train.max_staleness, drain_step(self.cfg, step))
        while self.next_step <= last:
            state = self.sampler.state()
            records = self.sampler.draw(self.cfg.rollout.prompts_per_step)
            pending = self.controller.submit_generate(records, step_seed(self.cfg, self.next_step))
            self.sent.append(_Sent(self.next_step, state, pending))
            self.next_step += 1

    def take(self, step: int) -> Taken:
        """Step `step`'s batch, waiting for it if it is still being sampled; with grpo.dynamic_sampling,
        its groups without signal are replaced by groups of prompts drawn and sampled now."""
        if not self.sent or self.sent[0].step != step:
            have = [s.step for s in self.sent]
            raise RuntimeError(f"step {step}: its rollout batch was never sent (batches in flight: {have})")
        sent = self.sent.popleft()
        batch, records = self.controller.collect(sent.rollout), sent.rollout.records
        stats = {"groups/zero_signal_fraction": zero_signal_fraction(batch)}
        if not self.cfg.grpo.dynamic_sampling:
            return Taken(batch, records, batch, stats)

        def resample(count: int, round_: int) -> tuple[RolloutBatch, list]:
            more = self.sampler.draw(count)
            return self.controller.generate(more, resample_seed(self.cfg, step, round_)), more

        kept = keep_signal(batch, records, self.cfg.rollout.prompts_per_step, resample,
                           self.cfg.grpo.max_resample_rounds, min_groups=len(self.controller.learners))
        return Taken(kept.batch, kept.records, batch, {**stats, **kept.stats})

    def queued_prompts(self) -> int:
        """Prompts sent and not yet trained on (what a weight update waits behind)."""
        return sum(len(s.rollout.records) for s in self.sent)

    def sampler_state(self) -> dict:
        """The sampler as a checkpoint stores it: before the draws of the batches in flight."""
        return self.sent[0].sampler_state if self.sent else self.sampler.state()

    def restore(self, sampler_state: dict, done_steps: int) -> None:
        self.sampler.restore(sampler_state)
        self.sent.clear()
        self.next_step = done_steps + 1
