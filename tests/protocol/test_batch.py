"""RolloutBatch: layout checks, joining worker shards, and handing whole groups to learner ranks."""
import pytest

from protocol.batch import RolloutBatch
from medvqa.synthetic import make_synthetic_split

RECS = make_synthetic_split("MRI", "train", 3, seed=0, question_types=["contrast"], num_options=2)


def _batch(records, version=0, offset=0):
    n = 2 * len(records)
    ids = [offset + i for i in range(n)]
    return RolloutBatch(record_ids=[r.id for r in records], group_size=2, prompt_token_ids=[[offset + p] for p in range(len(records))],
                        completion_token_ids=[[i] for i in ids], completion_texts=[str(i) for i in ids],
                        sampling_logprobs=[[-0.5]] * n, rewards={"accuracy": [float(i) for i in ids]},
                        total_rewards=[float(i) for i in ids], finish_reasons=["stop"] * n, weight_version=version)


def test_select_prompts_keeps_whole_groups_in_order():
    part = _batch(RECS).select_prompts([2, 0])
    assert part.record_ids == [RECS[2].id, RECS[0].id]
    assert part.prompt_token_ids == [[2], [0]]
    assert part.completion_texts == ["4", "5", "0", "1"] and part.rewards["accuracy"] == [4.0, 5.0, 0.0, 1.0]


def test_concat_joins_shards_and_refuses_mixed_versions():
    joined = RolloutBatch.concat([_batch(RECS[:1]), _batch(RECS[1:], offset=10)])
    assert joined.completion_texts == ["0", "1", "10", "11", "12", "13"] and joined.num_samples == 6
    with pytest.raises(ValueError, match="different weight versions"):
        RolloutBatch.concat([_batch(RECS[:1], version=0), _batch(RECS[1:], version=1)])


def test_wrong_lengths_are_named():
    with pytest.raises(ValueError, match="total_rewards has 1 entries, expected 2"):
        RolloutBatch(record_ids=[RECS[0].id], group_size=2, prompt_token_ids=[[0]], completion_token_ids=[[0], [1]],
                     completion_texts=["a", "b"], sampling_logprobs=[[0.0], [0.0]], rewards={},
                     total_rewards=[1.0], finish_reasons=["stop", "stop"], weight_version=0)


def test_records_that_are_not_the_batch_prompts_are_named():
    batch = _batch(RECS)
    batch.check_records(list(RECS))
    with pytest.raises(ValueError, match=f"prompt 1: batch has record {RECS[1].id!r}, records give {RECS[2].id!r}"):
        batch.check_records([RECS[0], RECS[2], RECS[1]])
    with pytest.raises(ValueError, match="prompt 2: .* records give 'nothing' \\(3 vs 2 prompts\\)"):
        batch.check_records(list(RECS[:2]))
