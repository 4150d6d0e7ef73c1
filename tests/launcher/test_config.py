"""Config: YAML + key=value overrides, typed, with errors that name the key."""
import pytest

from launcher.config import Config, ConfigError, load_config


def test_defaults_yaml_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  group_size: 6\nlearner:\n  lr: 2.0e-5\n")
    cfg = load_config(str(f), ["learner.lr=3e-6", "grpo.beta=0", "logging.tags=[a,b]", "rewards.weights={format: 0.5, accuracy: 2}"])
    assert isinstance(cfg, Config)
    assert cfg.rollout.group_size == 6  # from the file
    assert cfg.learner.lr == pytest.approx(3e-6)  # the command line wins over the file
    assert cfg.grpo.beta == 0.0 and isinstance(cfg.grpo.beta, float)
    assert cfg.logging.tags == ["a", "b"]
    assert cfg.rewards.weights == {"format": 0.5, "accuracy": 2}
    assert cfg.rollout.temperature == 1.0  # untouched default


@pytest.mark.parametrize("override, names, hint", [
    ("rollout.group_sise=8", "rollout.group_sise", "rollout.group_size"),
    ("lerner.lr=1e-6", "lerner", "learner"),
    ("grpo.bta=0.1", "grpo.bta", "grpo.beta"),
    ("learner.zero_stag=3", "learner.zero_stag", "learner.zero_stage"),
])
def test_unknown_key_names_it_and_the_closest(override, names, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"'{names}'" in msg and f"did you mean '{hint}'" in msg


def test_unknown_key_in_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"rollout.temprature.*bad.yaml.*rollout.temperature"):
        load_config(str(f))


@pytest.mark.parametrize("override, key", [
    ("rollout.group_size=1", "rollout.group_size"),
    ("learner.lr=-1e-6", "learner.lr"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("learner.precision=fp8", "learner.precision"),
    ("grpo.loss_agg=sum", "grpo.loss_agg"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.group_size=abc", "rollout.group_size"),
    ("data.source=dicom", "data.source"),
    ("train.max_staleness=-1", "train.max_staleness"),
    ("grpo.tis_cap=0.5", "grpo.tis_cap"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_uneven_prompt_split_over_ranks_is_rejected():
    with pytest.raises(ConfigError, match="rollout.prompts_per_step"):
        load_config(None, ["rollout.prompts_per_step=5", "learner.num_ranks=2"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


@pytest.mark.parametrize("path", ["configs/tiny_cpu.yaml", "configs/medvlm_r1_2b.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.rollout.group_size >= 2


def test_paper_config_carries_the_published_recipe():
    cfg = load_config("configs/medvlm_r1_2b.yaml")
    assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.model.max_pixels) == (4, 512, 401408)
    assert (cfg.learner.zero_stage, cfg.learner.lr, cfg.grpo.beta, cfg.grpo.eps) == (3, 1e-6, 0.04, 1e-4)
    assert cfg.data.num_train == 600 and cfg.data.train_modalities == ["MRI"]


@pytest.mark.parametrize("override, module, name", [
    ("learner.lr_schedule=step", "learner.ds_config", "LR_SCHEDULES"),
    ("grpo.loss_agg=sum", "learner.grpo", "LOSS_AGGREGATIONS"),
    ("cluster.sync_backend=mpi", "protocol.weight_update", "SYNC_BACKENDS"),
    ("learner.precision=fp8", "protocol.choices", "PRECISIONS"),
    ("cluster.device=tpu", "protocol.choices", "DEVICES"),
    ("data.source=dicom", "medvqa.loaders", "SOURCES"),
])
def test_allowed_values_come_from_where_they_are_implemented(override, module, name):
    import importlib

    allowed = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert all(str(v) in str(err.value) for v in allowed), (str(err.value), allowed)


def test_kv_cache_fractions_go_to_the_engine_in_bytes_and_the_bucket_to_deepspeed():
    """rollout.kv_cache_gib: whole GiB through VLLM_CPU_KVCACHE_SPACE (vLLM parses it as an int), a fraction
    as kv_cache_memory_bytes with the variable left unset; learner.zero_bucket_elements sizes DeepSpeed's buckets."""
    from launcher.cluster import actor_env
    from learner.ds_config import deepspeed_config
    from rollout_workers.engine import engine_kwargs

    quarter = load_config(None, ["rollout.kv_cache_gib=0.25", "learner.zero_stage=3",
                                 "learner.zero_bucket_elements=50000000"])
    assert engine_kwargs(quarter, "m", 0)["kv_cache_memory_bytes"] == 2**28
    assert "VLLM_CPU_KVCACHE_SPACE" not in actor_env(quarter)
    zero = deepspeed_config(quarter, 1)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    whole = load_config(None, ["rollout.kv_cache_gib=2"])
    assert actor_env(whole)["VLLM_CPU_KVCACHE_SPACE"] == "2" and engine_kwargs(whole, "m", 0)["kv_cache_memory_bytes"] == 2 * 2**30
    assert deepspeed_config(whole, 1)["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's own
    with pytest.raises(ConfigError, match=r"config key 'rollout.kv_cache_gib': must be positive, got 0"):
        load_config(None, ["rollout.kv_cache_gib=0"])
    with pytest.raises(ConfigError, match=r"config key 'learner.zero_bucket_elements': must be at least 1"):
        load_config(None, ["learner.zero_bucket_elements=0"])
