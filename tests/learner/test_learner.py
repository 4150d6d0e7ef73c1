"""The learner on CPU: model inputs rebuilt from rollout batches, and real DeepSpeed ZeRO-2/3 ranks.

All DeepSpeed ranks here are world size 1 on gloo and share the process's one torch.distributed
group (initialised by the first rank). Two learner ranks over Ray are covered by the end-to-end tests.
"""
import math

import pytest
import torch

from cluster_utils import free_port

from launcher.config import load_config
from learner.ds_config import lr_lambda
from learner.model_inputs import PromptMismatchError, collate_samples, encode_prompts
from learner.policy import PolicyModule, batch_kwargs
from protocol.batch import RolloutBatch
from medvqa.prompt import load_processor, render_prompt
from medvqa.synthetic import make_synthetic_split

# Four completions per prompt; the first two of each group are rewarded, the last two are not.
TEXTS = [
    "<think>The lesion is on the left side.</think><answer>A</answer>",
    "<think>left</think><answer>A</answer>",
    "<think>There are two bright lesions.</think><answer>B</answer>",
    "<answer>B</answer> the right half",
]
REWARDS = [2.0, 1.0, 0.0, 0.0]
# Several DeepSpeed engines and GRPO steps per test or fixture: more than the default on a busy machine.
pytestmark = pytest.mark.timeout(900)


def _cfg(model_dir, *overrides):
    # The batches below carry placeholder engine log-probs (-1.0): no importance weights unless a test asks.
    return load_config(None, [f"model.path={model_dir}", "rollout.prompts_per_step=2", "rollout.group_size=4",
                              "rollout.max_new_tokens=32", "learner.micro_batch_size=3", "learner.lr=1e-3",
                              "grpo.beta=0.04", "train.steps=10", "grpo.tis_cap=0",
                              # ZeRO-3 really splits the tiny model's parameters (see test_learner_ranks).
                              "learner.zero3_persistence_threshold=0", *overrides])


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    return load_processor(tiny_model_dir, cfg.model.min_pixels, cfg.model.max_pixels)


@pytest.fixture(scope="module")
def records():
    # Two image sizes, so prompts differ in length (4 and 9 image tokens).
    return (make_synthetic_split("MRI", "train", 1, seed=0, num_options=2, image_size=56)
            + make_synthetic_split("CT", "train", 1, seed=0, num_options=4, image_size=84))


def _prompt_ids(record, processor) -> list[int]:
    out = processor(text=[render_prompt(record, processor)], images=[record.load_image()], return_tensors="pt")
    return out["input_ids"][0].tolist()


def _completion(processor, text: str) -> list[int]:
    tok = processor.tokenizer
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


def _batch(records, processor, sampling_logprobs=None) -> RolloutBatch:
    g = len(TEXTS)
    comps = [_completion(processor, t) for _ in records for t in TEXTS]
    rewards = [r for _ in records for r in REWARDS]
    return RolloutBatch(
        record_ids=[r.id for r in records], group_size=g, prompt_token_ids=[_prompt_ids(r, processor) for r in records],
        completion_token_ids=comps, completion_texts=[t for _ in records for t in TEXTS],
        sampling_logprobs=sampling_logprobs or [[-1.0] * len(c) for c in comps],
        rewards={"format": rewards}, total_rewards=rewards, finish_reasons=["stop"] * len(comps), weight_version=0)


def _policy_logprobs(module, prompts, sample_prompt, completions, pad_id) -> list[torch.Tensor]:
    batch = collate_samples(prompts, sample_prompt, completions, pad_id)
    with torch.no_grad():
        logits = module(**batch_kwargs(batch, None, "cpu"))[:, :-1]
    targets, mask = batch.completion_targets()
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return [row[m.bool()] for row, m in zip(lp, mask)]


# ---- model inputs, without DeepSpeed ----------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return PolicyModule(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval())


def test_right_padding_leaves_completion_logprobs_unchanged(policy, records, processor):
    prompts = encode_prompts(records, [_prompt_ids(r, processor) for r in records], processor)
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    short, long_ = _completion(processor, TEXTS[1]), _completion(processor, TEXTS[0])
    pad = processor.tokenizer.pad_token_id
    together = _policy_logprobs(policy, prompts, [1, 0, 1], [short, long_, long_], pad)
    alone_a = _policy_logprobs(policy, prompts, [1], [short], pad)[0]
    alone_b = _policy_logprobs(policy, prompts, [0], [long_], pad)[0]
    assert together[0].shape == (len(short),) and together[1].shape == (len(long_),)
    torch.testing.assert_close(together[0], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1], alone_b, atol=1e-5, rtol=0)
    assert (together[2] - together[1]).abs().max() > 1e-3  # the same completion after another prompt


def test_policy_forward_matches_the_hf_forward(policy, records, processor):
    enc = encode_prompts(records[1:], [_prompt_ids(records[1], processor)], processor)[0]
    comp = _completion(processor, TEXTS[0])
    ids = torch.tensor([enc.input_ids + comp])
    types = torch.tensor([enc.mm_token_type_ids + [0] * len(comp)])
    with torch.no_grad():
        logits = policy.hf(input_ids=ids, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                           mm_token_type_ids=types).logits[0, len(enc.input_ids) - 1:-1]
    ref = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(comp).unsqueeze(-1)).squeeze(-1)
    ours = _policy_logprobs(policy, [enc], [0], [comp], processor.tokenizer.pad_token_id)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_shared_prompt_pass_gives_the_full_pass_logits_and_gradient(tiny_model_dir, records, processor):
    """Two prompts of different lengths (4 and 9 image tokens), samples of both interleaved, completions of
    different lengths: one pass per prompt plus one over the completions equals prompt + completion per
    sample, in the logits of every completion token and in the gradient of a loss on them."""
    from transformers import Qwen2VLForConditionalGeneration

    prompts = encode_prompts(records, [_prompt_ids(r, processor) for r in records], processor)
    comps = [_completion(processor, t) for t in (TEXTS[0], TEXTS[1], TEXTS[3], TEXTS[2], TEXTS[1])]
    batch = collate_samples(prompts, [1, 0, 1, 1, 0], comps, processor.tokenizer.pad_token_id)
    targets, mask = batch.completion_targets()
    out = {}
    for share in (False, True):
        module = PolicyModule(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float64))
        logits = module(**batch_kwargs(batch, None, "cpu", share_prompts=share))[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (-(lp * mask.double() * torch.linspace(-1, 2, lp.shape[1], dtype=torch.float64)).sum()).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        out[share] = (lp[mask.bool()], grads)
    assert out[True][0].shape == (sum(map(len, comps)),)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-10, rtol=0)
    assert set(out[True][1]) == set(out[False][1]) and any(n.startswith("hf.model.visual") for n in out[True][1])
    for name, g in out[False][1].items():
        # float64 throughout, except the rotary embeddings, which round through float32
        assert float((out[True][1][name] - g).abs().max()) <= 1e-6 * float(g.abs().max()), name


def test_completion_holding_an_image_token_is_scored_as_text(policy, records, processor):
    """A sampled <|image_pad|> in a completion breaks HF's own forward; ours treats it as the text
    token the engine embedded, and causality holds around it."""
    enc = encode_prompts(records[:1], [_prompt_ids(records[0], processor)], processor)[0]
    head = _completion(processor, TEXTS[1])[:5]
    comp = head + [processor.image_token_id] + head
    types = torch.tensor([enc.mm_token_type_ids + [0] * len(comp)])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        policy.hf(input_ids=torch.tensor([enc.input_ids + comp]), pixel_values=enc.pixel_values,
                  image_grid_thw=enc.image_grid_thw, mm_token_type_ids=types)
    pad = processor.tokenizer.pad_token_id
    full = _policy_logprobs(policy, [enc], [0], [comp], pad)[0]
    prefix = _policy_logprobs(policy, [enc], [0], [head], pad)[0]
    assert torch.isfinite(full).all() and full.shape == (len(comp),)
    torch.testing.assert_close(full[:5], prefix, atol=1e-5, rtol=0)


def test_prompt_id_mismatch_names_the_record(records, processor):
    ids = _prompt_ids(records[1], processor)
    image = processor.image_token_id
    dropped = ids[:]
    dropped.remove(image)  # one image token fewer, as a processor with other pixel bounds would give
    with pytest.raises(PromptMismatchError, match=rf"record '{records[1].id}'.*9 image tokens.*8 image tokens"):
        encode_prompts(records, [_prompt_ids(records[0], processor), dropped], processor)
    with pytest.raises(PromptMismatchError, match="first difference at position 3"):
        encode_prompts(records[1:], [ids[:3] + [ids[3] + 1] + ids[4:]], processor)


def test_collate_marks_completion_tokens_only(records, processor):
    prompts = encode_prompts(records, [_prompt_ids(r, processor) for r in records], processor)
    batch = collate_samples(prompts, [1, 1, 0], [[5, 6], [7], [8, 9, 10]], pad_id=0, prompt_keys=[10, 11])
    p0, p1 = len(prompts[0].input_ids), len(prompts[1].input_ids)
    assert batch.input_ids.shape == (3, max(p1 + 2, p0 + 3))
    assert batch.completion_mask.sum(1).tolist() == [2.0, 1.0, 3.0]
    assert batch.completion_mask[0, p1:p1 + 2].tolist() == [1.0, 1.0] and batch.completion_mask[0, :p1].sum() == 0
    assert batch.attention_mask.sum(1).tolist() == [p1 + 2, p1 + 1, p0 + 3]
    assert batch.mm_token_type_ids.sum(1).tolist() == [9, 9, 4]
    assert batch.prompt_keys == [11, 10] and batch.sample_prompt.tolist() == [0, 0, 1]
    assert batch.image_grid_thw.tolist() == [[1, 6, 6], [1, 4, 4]]  # each image once, first use first
    assert batch.pixel_values.shape[0] == 36 + 16
    assert batch.min_prompt_len == min(p0, p1)


def test_lr_schedules():
    cos = lr_lambda("cosine", warmup_steps=2, total_steps=6)
    assert [round(cos(k), 4) for k in range(7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    lin = lr_lambda("linear", warmup_steps=0, total_steps=4)
    assert [lin(k) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 4, 10)(0) == 0.25
    with pytest.raises(ValueError, match="learner.lr_schedule"):
        lr_lambda("step", 0, 1)


# ---- DeepSpeed ranks (world size 1, gloo) ----------------------------------------------------------

@pytest.fixture(scope="module")
def port():
    return free_port()


def _rank(model_dir, port, *overrides):
    from learner.actor import LearnerRank

    return LearnerRank(_cfg(model_dir, *overrides), model_dir, 0, 1, "127.0.0.1", port)


def _all_logprobs(rank, batch, records) -> list[list[float]]:
    g = batch.group_size
    return [rank.completion_logprobs(records[i // g], batch.prompt_token_ids[i // g], c)
            for i, c in enumerate(batch.completion_token_ids)]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, port, records, processor):
    """Per ZeRO stage: 4 GRPO steps at a high rate (micro-batches of 3 over 8 samples, KL to the
    reference); the last step is told engine log-probs 0.25 below the learner's own."""
    out = {}
    for stage in (2, 3):
        rank = _rank(tiny_model_dir, port, f"learner.zero_stage={stage}")
        batch = _batch(records, processor)
        run = {"rank": rank, "checksum0": rank.weights_checksum(), "before": _all_logprobs(rank, batch, records)}
        run["metrics"] = [rank.train_on(batch, records) for _ in range(3)]
        shifted = [[x - 0.25 for x in row] for row in _all_logprobs(rank, batch, records)]
        run["metrics"].append(rank.train_on(_batch(records, processor, sampling_logprobs=shifted), records))
        run["after"], run["checksum1"] = _all_logprobs(rank, batch, records), rank.weights_checksum()
        out[stage] = run
    return out


def test_checksum_is_stage_independent(trained, policy):
    from learner.zero_params import weights_checksum

    hf_sum = weights_checksum(policy.hf)
    assert trained[2]["checksum0"] == pytest.approx(hf_sum, rel=1e-12)
    assert trained[3]["checksum0"] == pytest.approx(hf_sum, rel=1e-12)
    assert abs(trained[2]["checksum1"] - hf_sum) > 1e-3


@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_steps_move_logprobs_with_the_advantage(trained, stage, processor):
    run = trained[stage]
    change = [sum(a) - sum(b) for a, b in zip(run["after"], run["before"])]
    for group in (change[:4], change[4:]):
        assert group[0] > 1.0 and group[1] > 0.0  # rewarded completions became likelier
        assert group[2] < -1.0 and group[3] < -1.0  # unrewarded ones less likely
    n_tokens = sum(len(_completion(processor, t)) for t in TEXTS) * 2
    for i, m in enumerate(run["metrics"]):
        assert m["num_tokens"] == n_tokens and m["lr"] == pytest.approx(1e-3)
        assert torch.isfinite(torch.tensor([m["loss"], m["grad_norm"], m["entropy"]])).all()
        assert 0 < m["grad_norm"] and 0 < m["entropy"] < 7.0  # log(vocab) = 6.95
    assert run["metrics"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any step
    assert run["metrics"][0]["loss"] == pytest.approx(0.0, abs=1e-6)  # on-policy, zero-mean advantages
    assert run["metrics"][-1]["kl"] > 1e-3
    assert run["checksum1"] != pytest.approx(run["checksum0"], rel=1e-9)


def test_logprob_diff_reports_the_engine_mismatch(trained):
    for stage in (2, 3):
        last = trained[stage]["metrics"][-1]
        assert last["logprob_diff/mean_abs"] == pytest.approx(0.25, abs=1e-4)
        assert last["logprob_diff/max_abs"] == pytest.approx(0.25, abs=1e-4)
        assert trained[stage]["metrics"][0]["logprob_diff/mean_abs"] > 0.5  # the -1.0 placeholders


def test_zero2_and_zero3_train_identically(trained):
    for a, b in zip(trained[2]["after"], trained[3]["after"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert trained[2]["checksum1"] == pytest.approx(trained[3]["checksum1"], rel=1e-7)


def test_zero3_save_reload_and_sync_tensors(trained, tmp_path, records, processor):
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    rank = trained[3]["rank"]
    out = rank.save(str(tmp_path / "saved"))
    reloaded = PolicyModule(Qwen2VLForConditionalGeneration.from_pretrained(out).eval())
    proc = load_processor(out, rank.cfg.model.min_pixels, rank.cfg.model.max_pixels)
    assert _prompt_ids(records[1], proc) == _prompt_ids(records[1], processor)
    batch = _batch(records, processor)
    prompts = encode_prompts(records, batch.prompt_token_ids, proc)
    again = _policy_logprobs(reloaded, prompts, [i // 4 for i in range(8)], batch.completion_token_ids,
                             proc.tokenizer.pad_token_id)
    for new, old in zip(again, trained[3]["after"]):
        assert new.tolist() == pytest.approx(old, abs=1e-5)

    on_disk = load_file(f"{out}/model.safetensors")
    sent = {name: t.clone() for name, t in rank.named_parameters_for_sync()}
    assert set(sent) == set(on_disk) and "visual.patch_embed.proj.weight" in sent
    for name, t in sent.items():
        assert torch.equal(t, on_disk[name]), name
    meta = rank.weight_update_meta()  # the wire form: plain lists, as the engines receive it
    assert meta["names"] == list(sent) and meta["shapes"] == [list(t.shape) for t in sent.values()]
    assert meta["dtype_names"] == ["float32"] * len(sent)


@pytest.mark.parametrize("stage,agg,checkpointing,policy_loss", [
    (3, "token_mean", False, "ppo_clip"), (2, "seq_mean_token_mean", False, "ppo_clip"),
    (0, "seq_mean_token_sum_norm", True, "ppo_clip"), (2, "seq_mean_token_mean", False, "gspo"),
    (2, "token_mean", False, "cispo")])
def test_accumulation_equals_one_big_micro_batch(tiny_model_dir, port, records, processor, stage, agg,
                                                 checkpointing, policy_loss):
    """Micro-batches of 3 (3, 3, 2 samples of unequal lengths, recomputed activations in one case) or
    of all 8: the same gradient and step, for each policy loss."""
    batch = _batch(records, processor)
    results = []
    for micro in (8, 3):
        rank = _rank(tiny_model_dir, port, f"learner.zero_stage={stage}", f"grpo.loss_agg={agg}",
                     f"grpo.policy_loss={policy_loss}",
                     f"learner.micro_batch_size={micro}", "grpo.beta=0.0", "learner.grad_clip=0",
                     f"learner.gradient_checkpointing={str(checkpointing and micro == 3).lower()}")
        assert rank.hf_model.training and rank.hf_model.is_gradient_checkpointing == (checkpointing and micro == 3)
        m = rank.train_on(batch, records)
        results.append((m, _all_logprobs(rank, batch, records)))
    (m8, lp8), (m3, lp3) = results
    assert m3["grad_norm"] > 0.1 and m3["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)
    assert m3["loss"] == pytest.approx(m8["loss"], abs=1e-6)
    for a, b in zip(lp3, lp8):
        assert a == pytest.approx(b, abs=1e-4)


def test_two_passes_with_a_frozen_vision_tower(tiny_model_dir, port, records, processor):
    """learner.mu=2: two optimiser steps per batch, the second off-policy; the frozen tower never moves."""
    from learner.zero_params import weights_checksum

    rank = _rank(tiny_model_dir, port, "learner.zero_stage=2", "learner.mu=2", "model.freeze_vision=true",
                 "learner.lr_schedule=linear", "train.steps=2", "learner.lr=1e-2")
    hf = rank.hf_model
    vision0, text0 = weights_checksum(hf.model.visual), weights_checksum(hf.model.language_model)
    m = rank.train_on(_batch(records, processor), records)
    assert m["lr"] == pytest.approx(1e-2 * (1.0 + 0.75) / 2)  # steps 0 and 1 of 4 on the linear schedule
    assert rank.engine.get_lr()[0] == pytest.approx(0.5e-2)
    assert abs(m["ratio_mean"] - 1.0) > 1e-4 and m["clip_fraction"] > 0  # the second pass is off-policy
    assert weights_checksum(hf.model.visual) == vision0
    assert weights_checksum(hf.model.language_model) != pytest.approx(text0, rel=1e-9)
    # Weight sync sends what trains: the language model and head, not the frozen tower.
    sent = [name for name, _ in rank.named_parameters_for_sync()]
    assert rank.weight_update_meta()["names"] == sent
    assert "lm_head.weight" in sent and not [n for n in sent if n.startswith("visual.")]
    trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert sum(p.numel() for p in hf.model.visual.parameters()) > 0 and trainable < sum(p.numel() for p in hf.parameters())
    assert sum(math.prod(s) for s in rank.weight_update_meta()["shapes"]) == trainable


def test_importance_weights_scale_the_step_gradient(tiny_model_dir, port, records, processor):
    """Engine log-probs equal to the learner's: weights 1. The engine 4x less sure of every token: each
    weight 4 truncated to 2, so the gradient doubles. 2x surer: weights 0.5, half the gradient."""
    rank = _rank(tiny_model_dir, port, "learner.zero_stage=2", "grpo.tis_cap=2", "grpo.beta=0.0",
                 "learner.grad_clip=0", "learner.lr=1e-12")  # the weights stay put between the three steps
    own = _all_logprobs(rank, _batch(records, processor), records)
    runs = {shift: rank.train_on(_batch(records, processor, [[x + shift for x in row] for row in own]), records)
            for shift in (0.0, -math.log(4), math.log(2))}
    same, less_sure, surer = runs[0.0], runs[-math.log(4)], runs[math.log(2)]
    assert same["tis/weight_mean"] == pytest.approx(1.0, abs=1e-5) and same["tis/clipped_fraction"] == 0.0
    assert less_sure["tis/weight_mean"] == pytest.approx(2.0, abs=1e-5) and less_sure["tis/clipped_fraction"] == 1.0
    assert surer["tis/weight_mean"] == pytest.approx(0.5, abs=1e-5) and surer["tis/clipped_fraction"] == 0.0
    assert same["grad_norm"] > 0.1
    assert less_sure["grad_norm"] == pytest.approx(2 * same["grad_norm"], rel=1e-4)
    assert surer["grad_norm"] == pytest.approx(0.5 * same["grad_norm"], rel=1e-4)
    assert less_sure["loss"] == pytest.approx(2 * same["loss"], rel=1e-4, abs=1e-7)
