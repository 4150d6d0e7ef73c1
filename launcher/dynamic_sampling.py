"""Dynamic sampling (DAPO's group filter; `grpo.dynamic_sampling`).

A group whose G rewards are all equal (every answer right, or every one wrong) has zero advantage for
every sample: it teaches nothing, yet costs a learner pass. With the filter on, such groups are dropped
and more prompts are drawn and sampled, `rollout.prompts_per_step - kept` at a time, until
`rollout.prompts_per_step` groups with signal are gathered or `grpo.max_resample_rounds` rounds are
spent; then the step trains on what there is (`groups/trained` says how many). A step keeps at least one
group per learner rank (each rank trains whole groups): when fewer groups have signal, zero-signal ones
from the first batch make up the number (they add only the KL term).

The step's reward metrics are those of its first batch, an unfiltered sample of the policy, so that
curves with and without the filter compare. The extra prompts come from the run's prompt sampler, so a
checkpoint's sampler position covers them and a resumed run draws the same ones.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from protocol.batch import RolloutBatch

# (prompts wanted, round) -> (their scored batch, their records): draws from the sampler and samples.
Resample = Callable[[int, int], tuple[RolloutBatch, list]]


def signal_prompts(batch: RolloutBatch) -> list[int]:
    """The prompts whose group rewards are not all equal, in order."""
    g, r = batch.group_size, batch.total_rewards
    return [p for p in range(batch.num_prompts) if max(r[p * g:(p + 1) * g]) != min(r[p * g:(p + 1) * g])]


def zero_signal_fraction(batch: RolloutBatch) -> float:
    return 1.0 - len(signal_prompts(batch)) / batch.num_prompts


@dataclasses.dataclass
class Filtered:
    batch: RolloutBatch  # the groups to train on, first batch's first
    records: list
    stats: dict


def keep_signal(batch: RolloutBatch, records: list, want: int, resample: Resample, rounds: int,
                min_groups: int = 1) -> Filtered:
    """The groups of `batch` with signal, topped up from `resample` rounds to `want` groups (at most
    `rounds` rounds), then to `min_groups` with the first batch's zero-signal groups if need be."""
    keep = signal_prompts(batch)
    parts, kept_records = [batch.select_prompts(keep)], [records[p] for p in keep]
    done, prompts, generated = 0, 0, batch.num_samples
    while len(kept_records) < want and done < rounds:
        done += 1
        more, more_records = resample(want - len(kept_records), done)
        prompts, generated = prompts + more.num_prompts, generated + more.num_samples
        sig = signal_prompts(more)[:want - len(kept_records)]
        parts.append(more.select_prompts(sig))
        kept_records += [more_records[p] for p in sig]
    with_signal = len(kept_records)
    if with_signal < min_groups:
        fill = [p for p in range(batch.num_prompts) if p not in keep][:min_groups - with_signal]
        parts.append(batch.select_prompts(fill))
        kept_records += [records[p] for p in fill]
    trained = RolloutBatch.concat([p for p in parts if p.num_prompts], sequential=True)
    stats = {"resample/rounds": done, "resample/prompts": prompts, "samples/generated": generated,
             "groups/trained": len(kept_records), "groups/with_signal": with_signal}
    return Filtered(trained, kept_records, stats)
