"""The one typed config: the schema's dataclasses (protocol/config.py, where every field is documented)
merged by OmegaConf from a YAML file and `key=value` overrides, then validated.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from launcher.config_checks import ConfigError, check as _check, check_finite, check_minimums, check_rewards, load_yaml
from protocol.config import (  # noqa: F401  (the schema, re-exported: launcher code names it from here)
    ClusterConfig, Config, DataConfig, GRPOConfig, LearnerConfig, LoggingConfig, ModelConfig, RewardsConfig,
    RolloutConfig, SFTConfig, TrainConfig,
)


def _section_keys() -> list[str]:
    out = []
    for section in dataclasses.fields(Config):
        out.append(section.name)
        sub = type(getattr(Config(), section.name))
        out += [f"{section.name}.{f.name}" for f in dataclasses.fields(sub)]
    return out


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _section_keys(), n=1, cutoff=0.5)
    if not close:  # a misspelt leaf under a right section: compare leaf names too
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in _section_keys() if "." in k}
        near = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
        close = [leaves[near[0]]] if near else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


def _walk_unknown(node: dict, schema, prefix: str, where: str):
    for key, value in node.items():
        full = f"{prefix}{key}"
        if not isinstance(schema, dict) or key not in schema:
            raise _unknown_key_error(full, where)
        if isinstance(schema[key], dict) and not isinstance(value, dict):
            raise ConfigError(f"config section '{full}' must be a mapping of keys, got {value!r} ({where})")
        if isinstance(value, dict) and isinstance(schema[key], dict) and schema[key] and full != "rewards.weights":
            _walk_unknown(value, schema[key], full + ".", where)


def _merge(base, overlay: dict, where: str):
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    _walk_unknown(overlay, schema, "", where)
    try:
        return OmegaConf.merge(base, overlay)
    except (ValidationError, ConfigKeyError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(getattr(exc, "msg", exc)).splitlines()[0]
        raise ConfigError(f"config key '{key}' ({where}): {reason}") from None


def _parse_overrides(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parsed = _yaml_value(raw)
        node = nested
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `rollout=5 rollout.group_size=4`
                raise ConfigError(f"config section '{'.'.join(parts[:i + 1])}' must be a mapping of keys, "
                                  f"got {node!r} (on the command line)")
        node[parts[-1]] = parsed
    return nested


def _yaml_value(raw: str):
    import yaml

    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; validated. Returns a typed Config."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, load_yaml(Path(path)), f"in {path}")
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "on the command line")
    obj: Config = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def _one_of(value, allowed, key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")


def validate(cfg: Config) -> None:
    """Reject values that cannot run, naming the key. Each set of allowed values is read from the
    module that implements it."""
    from learner.ds_config import LR_SCHEDULES, ZERO_STAGES
    from learner.grpo import LOSS_AGGREGATIONS, POLICY_LOSSES, policy_loss_conflict
    from medvqa.loaders import SOURCES
    from protocol.choices import DEVICES, PRECISIONS
    from protocol.weight_update import SYNC_BACKENDS

    check_finite(cfg)
    check_minimums(cfg)
    check_rewards(cfg.rewards.weights)
    r, lr, g = cfg.rollout, cfg.learner, cfg.grpo
    _check(r.group_size >= 2, "rollout.group_size", f"must be at least 2 for group advantages, got {r.group_size}")
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be at least 1")
    _check(r.num_workers >= 1, "rollout.num_workers", "must be at least 1")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be at least 1")
    _check(r.temperature >= 0, "rollout.temperature", f"must be >= 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be at least 1")
    _check(lr.lr > 0, "learner.lr", f"must be positive, got {lr.lr}")
    _one_of(lr.zero_stage, ZERO_STAGES, "learner.zero_stage")
    _one_of(lr.precision, PRECISIONS, "learner.precision")
    _one_of(lr.lr_schedule, LR_SCHEDULES, "learner.lr_schedule")
    _check(lr.num_ranks >= 1, "learner.num_ranks", "must be at least 1")
    _check(r.prompts_per_step % lr.num_ranks == 0, "rollout.prompts_per_step",
           f"{r.prompts_per_step} prompts cannot be shared evenly by learner.num_ranks={lr.num_ranks}; "
           "every rank must run the same number of micro-batches")
    _check(lr.micro_batch_size >= 1, "learner.micro_batch_size", "must be at least 1")
    _check(lr.mu >= 1, "learner.mu", "must be at least 1")
    _check(lr.sync_every >= 1, "learner.sync_every", "must be at least 1")
    _check(lr.zero3_persistence_threshold >= 0, "learner.zero3_persistence_threshold", "must be >= 0")
    _check(lr.zero_bucket_elements >= 1, "learner.zero_bucket_elements", "must be at least 1")
    _check(lr.grad_clip >= 0, "learner.grad_clip", "must be >= 0")
    _check(g.beta >= 0, "grpo.beta", f"must be >= 0, got {g.beta}")
    _check(g.clip_low >= 0 and g.clip_high >= 0, "grpo.clip_low", "clip ranges must be >= 0")
    _check(g.tis_cap == 0 or g.tis_cap >= 1, "grpo.tis_cap", f"must be 0 (off) or at least 1, got {g.tis_cap}")
    _one_of(g.loss_agg, LOSS_AGGREGATIONS, "grpo.loss_agg")
    _one_of(g.policy_loss, POLICY_LOSSES, "grpo.policy_loss")
    conflict = policy_loss_conflict(g.policy_loss, g.loss_agg)
    _check(conflict is None, "grpo.policy_loss", str(conflict))
    _one_of(cfg.cluster.device, DEVICES, "cluster.device")
    _one_of(cfg.cluster.sync_backend, SYNC_BACKENDS, "cluster.sync_backend")
    _check(r.gpu_memory_utilization is None or 0 < r.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization",
           f"must be in (0, 1), got {r.gpu_memory_utilization}")
    _check_colocation(cfg)
    _one_of(cfg.data.source, ("synthetic",) + tuple(SOURCES), "data.source")
    _check(2 <= cfg.data.num_options <= 10, "data.num_options", "must be between 2 and 10")
    _check(0 < cfg.data.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
    _check(cfg.data.num_train is None or cfg.data.num_train >= 1, "data.num_train", "must be at least 1")
    _check(cfg.train.steps >= 0, "train.steps", "must be >= 0")
    cfg.train.resume = normalize_resume(cfg.train.resume)
    _check(cfg.model.min_pixels <= cfg.model.max_pixels, "model.min_pixels", "must not exceed model.max_pixels")
    _validate_lora(cfg)
    _validate_sft(cfg)
    if cfg.learner.precision == "fp16" and cfg.cluster.device == "cpu":
        raise ConfigError("config key 'learner.precision': fp16 is not supported on the CPU profile; use fp32 or bf16")


def normalize_resume(value) -> str:
    """`train.resume` as given on the command line or in YAML: a bool or null read as text becomes
    "false"; "auto" and paths stay."""
    text = str(value).strip()
    return "false" if text.lower() in ("false", "none", "null", "no", "0", "") else text


def _validate_lora(cfg: Config) -> None:
    m = cfg.model
    _check(m.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0: off), got {m.lora_rank}")
    _check(m.lora_alpha > 0, "model.lora_alpha", f"must be positive, got {m.lora_alpha}")
    _check(0 <= m.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
    _check(len(m.lora_targets) > 0 and all(isinstance(t, str) and t for t in m.lora_targets), "model.lora_targets",
           f"must be a non-empty list of module names, got {m.lora_targets!r}")


def _validate_sft(cfg: Config) -> None:
    from learner.sft import TARGETS

    s = cfg.sft
    _one_of(s.target, TARGETS, "sft.target")
    _check(s.epochs >= 1, "sft.epochs", f"must be at least 1, got {s.epochs}")
    _check(s.steps is None or s.steps >= 1, "sft.steps", f"must be at least 1, got {s.steps}")
    _check(s.lr > 0, "sft.lr", f"must be positive, got {s.lr}")
    _check(s.batch_size >= 1 and s.batch_size % cfg.learner.num_ranks == 0, "sft.batch_size",
           f"{s.batch_size} records cannot be shared evenly by learner.num_ranks={cfg.learner.num_ranks}")


def _check_colocation(cfg: Config) -> None:
    from protocol.weight_update import resolve_backend

    c, r = cfg.cluster, cfg.rollout
    try:
        resolve_backend(c.sync_backend, c.device, c.colocate)
    except ValueError as exc:
        raise ConfigError(f"config key 'cluster.sync_backend': {exc}") from None
    if not c.colocate:
        return
    _check(r.num_workers == cfg.learner.num_ranks, "rollout.num_workers",
           f"with cluster.colocate each learner rank shares its GPU with one engine: set rollout.num_workers="
           f"{cfg.learner.num_ranks} (learner.num_ranks), got {r.num_workers}")
    _check(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
           f"with cluster.colocate an engine has its learner rank's one GPU, got {r.tensor_parallel_size}")
    _check(cfg.train.max_staleness == 0, "train.max_staleness",
           "with cluster.colocate the engine sleeps while its learner rank trains, so generation cannot run "
           f"ahead: set 0, got {cfg.train.max_staleness}")


def to_dict(cfg: Config) -> dict:
    """Plain nested dicts (for W&B's run config)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
