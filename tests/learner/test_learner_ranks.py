"""Two learner ranks against one: the same rollout batch, split by the driver, gives the same step.

Three Ray actors host learner ranks (one 1-rank world, one 2-rank world). Each actor keeps its
process's torch.distributed group across tests and builds a fresh `LearnerRank` per test, so every
(ZeRO stage, loss aggregation) pair starts from the tiny model and the tests run in any order.
"""
from __future__ import annotations

import gc
import sys

import pytest

from cluster_utils import free_port
import ray
import torch

from launcher import cluster, controller
from launcher.controller import Controller
from launcher.actor_group import ActorCallError, ActorGroup
from launcher.config import load_config
from learner.grpo import LOSS_AGGREGATIONS
from medvqa.prompt import load_processor, render_prompt
from medvqa.synthetic import make_synthetic_split
from protocol.batch import RolloutBatch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

G = 4
# Per prompt: rewards of its 4 completions (rotated per prompt so each group's advantages differ).
REWARDS = [2.0, 1.0, 0.0, 0.0]
TEXTS = [
    "<think>The lesion is on the left side.</think><answer>A</answer>",
    "<think>left</think><answer>A</answer>",
    "<think>There are two bright lesions.</think><answer>B</answer>",
    "<answer>B</answer> the right half",
]
# Tolerances of "the same step": float sums in another order (ranks, micro-batches) and nothing else.
# Adam's first step moves an entry by lr * g / (|g| + 1e-8): about lr (1e-3) wherever the gradient is not
# tiny, and where it is, summation-order noise in g is magnified; 1e-5 is 1 % of a step.
LOSS_ATOL, NORM_RTOL, WEIGHT_ATOL = 1e-6, 1e-5, 1e-5


class RankHost:
    """A learner rank of a fixed (rank, world) slot; `build` replaces it with a freshly configured one.
    The first build sets up the process's torch.distributed group, later builds reuse it."""

    def __init__(self):
        self.rank = None

    def build(self, cfg, model_path: str, rank: int, world: int, addr: str, port: int) -> None:
        from learner.actor import LearnerRank

        self.rank = None  # free the previous engine before building the next
        gc.collect()
        self.rank = LearnerRank(cfg, model_path, rank, world, addr, port)

    def train_on(self, batch, records) -> dict:
        return self.rank.train_on(batch, records)

    def full_parameters(self):
        """Every parameter, whole (a collective under ZeRO-3): a dict on rank 0, None on the others."""
        params = {name: t.detach().clone() for name, t in self.rank.named_parameters_for_sync()}
        return params if self.rank.rank == 0 else None


def _cfg(model_dir, stage: int, agg: str):
    return load_config(None, [
        f"model.path={model_dir}", f"learner.zero_stage={stage}", f"grpo.loss_agg={agg}", "grpo.beta=0.0",
        "rollout.prompts_per_step=4", f"rollout.group_size={G}", "rollout.max_new_tokens=48",
        "learner.micro_batch_size=4", "learner.lr=1e-3", "cluster.cpus_per_actor=0.5", "train.steps=4",
        # The tiny model's parameters are all below DeepSpeed's default threshold, under which ZeRO-3
        # keeps them whole after their first use: 0 makes ZeRO-3 really split (and gather) every one.
        "learner.zero3_persistence_threshold=0",
        # The batch carries placeholder engine log-probs (-1.0): importance weights would scale the loss to ~0.
        "grpo.tis_cap=0"])


@pytest.fixture(scope="module")
def worlds(tiny_model_dir):
    """{1: [host], 2: [host, host]}: the 1-rank and the 2-rank world, each with its own group."""
    cluster.start_ray(_cfg(tiny_model_dir, 2, "token_mean"))
    # The actors cannot import this test module (tests/ is not a package on their path): ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    host = ray.remote(RankHost).options(num_cpus=0.5, max_concurrency=1)
    try:
        yield {world: {"hosts": ActorGroup("learner rank", [host.remote() for _ in range(world)]),
                       "port": free_port()} for world in (1, 2)}
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def batch_and_records(tiny_model_dir):
    """4 prompts; rank 0 of 2 gets prompts 0 and 2, whose completions are longer than those of 1 and 3,
    so that the ranks hold different numbers of tokens."""
    records = make_synthetic_split("MRI", "train", 4, seed=0, num_options=2, image_size=56)
    proc = load_processor(tiny_model_dir, 3136, 401408)
    tok = proc.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    texts, comps, rewards = [], [], []
    for p in range(len(records)):
        for k in range(G):
            text = TEXTS[k] + (" and the scan is bright" * (k + 1) if p % 2 == 0 else "")
            texts.append(text)
            comps.append(tok(text, add_special_tokens=False)["input_ids"] + [end])
            rewards.append(REWARDS[(k + p) % G])
    prompts = [proc(text=[render_prompt(r, proc)], images=[r.load_image()], return_tensors="pt")["input_ids"][0]
               .tolist() for r in records]
    batch = RolloutBatch(record_ids=[r.id for r in records], group_size=G, prompt_token_ids=prompts,
                         completion_token_ids=comps, completion_texts=texts,
                         sampling_logprobs=[[-1.0] * len(c) for c in comps], rewards={"format": rewards},
                         total_rewards=rewards, finish_reasons=["stop"] * len(comps), weight_version=0)
    return batch, records


def _build(world: dict, cfg, model_dir) -> Controller:
    hosts = world["hosts"]
    hosts.call_each("build", [(cfg, model_dir, r, len(hosts), "127.0.0.1", world["port"]) for r in range(len(hosts))],
                    doing="building learner ranks")
    return Controller(cfg=cfg, model_path=model_dir, learners=hosts, workers=ActorGroup("rollout worker", []),
                         placement=None, worker_pids=[], learner_port=world["port"])


def _full_parameters(actors: Controller) -> dict[str, torch.Tensor]:
    return actors.learners.call("full_parameters", doing="gathering the weights")[0]


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_take_the_step_one_rank_takes(worlds, batch_and_records, tiny_model_dir, stage, agg):
    batch, records = batch_and_records
    cfg = _cfg(tiny_model_dir, stage, agg)
    one, two = _build(worlds[1], cfg, tiny_model_dir), _build(worlds[2], cfg, tiny_model_dir)
    start = _full_parameters(one)
    assert min(t.numel() for t in start.values()) > 0, "ZeRO-3 placeholders instead of gathered parameters"
    shards = [controller.shard_for_rank(batch, records, r, 2)[0] for r in range(2)]
    tokens = [sum(len(c) for c in s.completion_token_ids) for s in shards]
    assert tokens[0] > tokens[1] + 20  # the ranks' shares of tokens differ: token means must span both
    m1, m2 = one.train(batch, records), two.train(batch, records)
    assert m2["num_tokens"] == m1["num_tokens"] == sum(tokens)
    assert m2["loss"] == pytest.approx(m1["loss"], abs=LOSS_ATOL)
    if agg != "seq_mean_token_mean":  # on-policy, that one is the mean advantage: 0 by construction
        assert abs(m1["loss"]) > 100 * LOSS_ATOL  # unequal lengths weigh the advantages unequally
    assert m1["grad_norm"] > 0.1 and m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=NORM_RTOL)
    after1, after2 = _full_parameters(one), _full_parameters(two)
    assert list(after1) == list(after2)
    moved = max(float((after1[n] - start[n]).abs().max()) for n in start)
    worst = max(float((after1[n] - after2[n]).abs().max()) for n in after1)
    assert moved > 5e-4, "the step did not move the weights"
    assert worst < WEIGHT_ATOL, f"1 rank and 2 ranks updated the weights differently (max |diff| {worst:.2e})"


@pytest.mark.timeout(400)  # without the check the ranks deadlock: let that fail well before the module's limit
def test_ranks_with_unequal_micro_batch_counts_fail_instead_of_hanging(worlds, batch_and_records, tiny_model_dir):
    """3 prompts over 2 ranks: 8 samples (2 micro-batches of 4) against 4 (1 micro-batch)."""
    batch, records = batch_and_records
    two = _build(worlds[2], _cfg(tiny_model_dir, 3, "token_mean"), tiny_model_dir)
    with pytest.raises(ActorCallError, match="learner ranks got shards of 1 to 2 micro-batches"):
        two.train(batch.select_prompts([0, 1, 2]), records[:3])
