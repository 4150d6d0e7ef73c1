"""Dynamic sampling (grpo.dynamic_sampling): exactly the groups whose rewards are all equal are dropped, and
prompts drawn in extra rounds refill the step to rollout.prompts_per_step; checked on hand-built rewards."""
import pytest

from launcher.config import ConfigError, load_config
from launcher.dynamic_sampling import keep_signal, signal_prompts, zero_signal_fraction
from protocol.batch import RolloutBatch

G = 2


def _batch(ids: list[str], rewards: list[list[float]], version: int = 0, generate_s: float = 1.0) -> RolloutBatch:
    n = len(ids) * G
    flat = [r for group in rewards for r in group]
    return RolloutBatch(record_ids=ids, group_size=G, prompt_token_ids=[[1, 2]] * len(ids),
                        completion_token_ids=[[i] for i in range(n)], completion_texts=[f"{ids[i // G]}:{i % G}" for i in range(n)],
                        sampling_logprobs=[[-0.5]] * n, rewards={"accuracy": flat}, total_rewards=flat,
                        finish_reasons=["stop"] * n, weight_version=version, generate_s=generate_s)


class Rounds:
    """Hands out prepared batches, one per round, and records what was asked for."""

    def __init__(self, *batches: RolloutBatch):
        self.batches, self.asked = list(batches), []

    def __call__(self, count: int, round_: int):
        self.asked.append((count, round_))
        batch = self.batches.pop(0)
        assert batch.num_prompts == count  # the sampler draws exactly what is missing
        return batch, [f"rec-{i}" for i in batch.record_ids]


def test_zero_signal_groups_are_dropped_and_refilled_in_rounds():
    first = _batch(["a", "b", "c", "d"], [[1, 1], [0, 1], [0, 0], [2, 1]], version=3)
    assert signal_prompts(first) == [1, 3] and zero_signal_fraction(first) == 0.5
    rounds = Rounds(_batch(["e", "f"], [[1, 0], [1, 1]], version=5), _batch(["g"], [[0, 2]], version=5))
    kept = keep_signal(first, [f"rec-{i}" for i in first.record_ids], 4, rounds, rounds=3)
    assert rounds.asked == [(2, 1), (1, 2)]  # round 1 draws the 2 missing prompts, round 2 the 1 still missing
    assert kept.batch.record_ids == ["b", "d", "e", "g"] and kept.records == ["rec-b", "rec-d", "rec-e", "rec-g"]
    assert kept.batch.total_rewards == [0, 1, 2, 1, 1, 0, 0, 2]
    assert kept.batch.completion_texts == ["b:0", "b:1", "d:0", "d:1", "e:0", "e:1", "g:0", "g:1"]
    assert kept.batch.weight_version == 3 and kept.batch.generate_s == 3.0  # as old as its oldest part
    assert kept.stats == {"resample/rounds": 2, "resample/prompts": 3, "samples/generated": 14,
                          "groups/trained": 4, "groups/with_signal": 4}


def test_spent_rounds_train_on_fewer_groups_and_say_so():
    first = _batch(["a", "b", "c"], [[1, 0], [1, 1], [0, 0]])
    rounds = Rounds(_batch(["d", "e"], [[1, 1], [0, 0]]))
    kept = keep_signal(first, list("abc"), 3, rounds, rounds=1)
    assert kept.batch.record_ids == ["a"] and kept.records == ["a"]
    assert kept.stats == {"resample/rounds": 1, "resample/prompts": 2, "samples/generated": 10,
                          "groups/trained": 1, "groups/with_signal": 1}


def test_a_full_batch_draws_nothing_more():
    first = _batch(["a", "b"], [[1, 0], [0, 2]])
    kept = keep_signal(first, list("ab"), 2, Rounds(), rounds=3)
    assert kept.batch.record_ids == ["a", "b"] and kept.stats["resample/rounds"] == 0
    assert kept.stats["samples/generated"] == 4


def test_every_learner_rank_gets_a_group_even_without_signal():
    first = _batch(["a", "b", "c"], [[1, 1], [0, 0], [2, 2]])
    kept = keep_signal(first, list("abc"), 3, Rounds(), rounds=0, min_groups=2)
    assert kept.batch.record_ids == ["a", "b"]  # zero-signal groups of the first batch, in order
    assert kept.stats["groups/trained"] == 2 and kept.stats["groups/with_signal"] == 0


def test_sequential_concat_refuses_other_group_sizes_and_shards_still_need_one_version():
    a, b = _batch(["a"], [[1, 0]], version=1), _batch(["b"], [[0, 1]], version=2)
    with pytest.raises(ValueError, match="different weight versions"):
        RolloutBatch.concat([a, b])
    assert RolloutBatch.concat([a, b], sequential=True).weight_version == 1


def test_config_keys():
    cfg = load_config(None, [])
    assert cfg.grpo.dynamic_sampling is False and cfg.grpo.max_resample_rounds == 3
    with pytest.raises(ConfigError, match="grpo.max_resample_rounds"):
        load_config(None, ["grpo.max_resample_rounds=-1"])
