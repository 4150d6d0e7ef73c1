"""The rollout batch: what crosses from the rollout workers to the driver and the learner, defined once.

Samples are laid out group by group: sample ``i`` answers prompt ``i // group_size``. A batch names
its prompts by record id only; the records themselves (with their images) travel once per hop, from
the driver to the workers and from the driver to the learner ranks.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RolloutBatch:
    record_ids: list[str]  # one per prompt, in the order the prompts were given
    group_size: int  # G completions per prompt
    prompt_token_ids: list[list[int]]  # per prompt, as the engine saw it (image tokens expanded)
    completion_token_ids: list[list[int]]  # per sample
    completion_texts: list[str]  # per sample, decoded
    sampling_logprobs: list[list[float]]  # per sample, per completion token, from the engine
    rewards: dict[str, list[float]]  # reward name -> per-sample unweighted value
    total_rewards: list[float]  # per sample, the weighted sum that drives the advantages
    finish_reasons: list[str]  # per sample: "stop" (closed by EOS/stop) or "length" (truncated)
    weight_version: int  # version of the policy weights that generated every sample
    generate_s: float = 0.0  # seconds the engine spent sampling and scoring (joined shards: the slowest)

    def __post_init__(self):
        n = len(self.record_ids) * self.group_size
        per_sample = {
            "completion_token_ids": self.completion_token_ids,
            "completion_texts": self.completion_texts,
            "sampling_logprobs": self.sampling_logprobs,
            "total_rewards": self.total_rewards,
            "finish_reasons": self.finish_reasons,
            **{f"rewards[{k}]": v for k, v in self.rewards.items()},
        }
        for name, values in per_sample.items():
            if len(values) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(values)} entries, expected {n} "
                                 f"({len(self.record_ids)} prompts x group {self.group_size})")
        if len(self.prompt_token_ids) != len(self.record_ids):
            raise ValueError("RolloutBatch.prompt_token_ids needs one entry per prompt")

    @property
    def num_samples(self) -> int:
        return len(self.record_ids) * self.group_size

    @property
    def num_prompts(self) -> int:
        return len(self.record_ids)

    def record_id_of(self, sample: int) -> str:
        return self.record_ids[sample // self.group_size]

    def check_records(self, records: list) -> None:
        """Fail naming the first mismatch when `records` are not this batch's prompts, in order."""
        ids = [r.id for r in records]
        if ids != self.record_ids:
            where = next((i for i, (a, b) in enumerate(zip(ids, self.record_ids)) if a != b), min(len(ids),
                                                                                                len(self.record_ids)))
            got = ids[where] if where < len(ids) else "nothing"
            want = self.record_ids[where] if where < len(self.record_ids) else "nothing"
            raise ValueError(f"rollout batch and its records differ at prompt {where}: batch has record "
                             f"{want!r}, records give {got!r} ({len(self.record_ids)} vs {len(ids)} prompts)")

    @staticmethod
    def concat(batches: list["RolloutBatch"], sequential: bool = False) -> "RolloutBatch":
        """Join the shards that several workers produced for one step (same group size and version). With
        `sequential`, batches sampled one after another (dynamic sampling's rounds): their weight versions
        may differ (the batch is as old as its oldest part) and their sampling times add up."""
        first = batches[0]
        if any(b.group_size != first.group_size for b in batches):
            raise ValueError("cannot concatenate rollout batches with different group sizes")
        versions = {b.weight_version for b in batches}
        if len(versions) != 1 and not sequential:
            raise ValueError(f"rollout shards come from different weight versions {sorted(versions)}")
        cat = lambda name: [x for b in batches for x in getattr(b, name)]  # noqa: E731
        return RolloutBatch(
            record_ids=cat("record_ids"), group_size=first.group_size,
            prompt_token_ids=cat("prompt_token_ids"), completion_token_ids=cat("completion_token_ids"),
            completion_texts=cat("completion_texts"), sampling_logprobs=cat("sampling_logprobs"),
            rewards={k: [x for b in batches for x in b.rewards[k]] for k in first.rewards},
            total_rewards=cat("total_rewards"), finish_reasons=cat("finish_reasons"),
            weight_version=min(versions),
            generate_s=(sum if sequential else max)(b.generate_s for b in batches),
        )

    def select_prompts(self, prompts: list[int]) -> "RolloutBatch":
        """The sub-batch of whole groups for the given prompt indices, in that order."""
        g = self.group_size
        samples = [p * g + j for p in prompts for j in range(g)]
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        return RolloutBatch(
            record_ids=pick(self.record_ids, prompts), group_size=g,
            prompt_token_ids=pick(self.prompt_token_ids, prompts),
            completion_token_ids=pick(self.completion_token_ids, samples),
            completion_texts=pick(self.completion_texts, samples),
            sampling_logprobs=pick(self.sampling_logprobs, samples),
            rewards={k: pick(v, samples) for k, v in self.rewards.items()},
            total_rewards=pick(self.total_rewards, samples), finish_reasons=pick(self.finish_reasons, samples),
            weight_version=self.weight_version, generate_s=self.generate_s,
        )
