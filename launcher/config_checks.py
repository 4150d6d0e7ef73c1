"""Checks of a config that name what is wrong: the YAML file (file, line, column), numbers that are not
finite, counts below their minimum, reward names the registry does not know. The schema is protocol/config.py;
the other rules live in launcher/config.py, which calls these."""
from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

from omegaconf import OmegaConf

from protocol.config import Config


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


def check(ok: bool, key: str, msg: str):
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _yaml_error(path: Path, exc) -> str:
    """One line: file, line and column (1-based) of a YAML syntax error, and what was being parsed."""
    at = lambda m: f", line {m.line + 1}, column {m.column + 1}" if m else ""  # noqa: E731
    started = f" ({exc.context} started at{at(exc.context_mark)[1:]})" if exc.problem and exc.context else ""
    return f"config file {path}{at(exc.problem_mark or exc.context_mark)}: YAML syntax error: " \
           f"{exc.problem or exc.context}{started}"


def load_yaml(path: Path) -> dict:
    """The file's sections as plain dicts; a syntax error names the file, line and column."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return loaded


_MINIMUMS = {  # counts and sizes with no rule of their own in validate(): the smallest value that can run
    "model.min_pixels": 1, "data.num_eval_per_modality": 1, "data.image_size": 1, "rollout.max_model_len": 1,
    "rollout.timeout_s": 0, "learner.timeout_s": 0, "learner.warmup_steps": 0, "learner.weight_decay": 0,
    "grpo.eps": 0, "grpo.max_resample_rounds": 0, "train.format_warmup_steps": 0, "train.eval_every": 0, "train.save_every": 0,
    "train.checkpoint_every": 0, "train.keep_checkpoints": 0, "train.max_staleness": 0, "logging.sample_every": 0,
    "logging.num_samples_logged": 0, "cluster.master_port": 0, "cluster.max_worker_restarts": 0}


def check_finite(cfg: Config) -> None:
    """inf or nan in any number (a learning rate of .inf would write a policy of NaN)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            items = value if isinstance(value, list) else [value]
            bad = any(isinstance(v, float) and not math.isfinite(v) for v in items)
            check(not bad, f"{section.name}.{f.name}", f"must be a finite number, got {value}")


def check_minimums(cfg: Config) -> None:
    for key, least in _MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        check(value >= least, key, f"must be at least {least}, got {value}")
    check(cfg.cluster.num_cpus is None or cfg.cluster.num_cpus >= 1, "cluster.num_cpus", "must be at least 1")
    for key, value in (("cluster.cpus_per_actor", cfg.cluster.cpus_per_actor), ("rollout.kv_cache_gib", cfg.rollout.kv_cache_gib),
                       ("train.format_warmup_lr", cfg.train.format_warmup_lr)):
        check(value > 0, key, f"must be positive, got {value}")


def check_rewards(weights: dict) -> None:
    """Names from the reward registry (importing `rewards` registers the built-in ones); finite weights."""
    from rewards import REWARD_FUNCTIONS

    check(bool(weights), "rewards.weights", "needs at least one reward")
    known = ", ".join(sorted(REWARD_FUNCTIONS))
    for name, weight in weights.items():
        hint = "".join(f"; did you mean {c!r}?" for c in difflib.get_close_matches(str(name), REWARD_FUNCTIONS, n=1))
        check(name in REWARD_FUNCTIONS, "rewards.weights",
              f"unknown reward {name!r} (registered rewards: {known}){hint}")
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        check(ok, f"rewards.weights.{name}", f"must be a finite number, got {weight!r}")
