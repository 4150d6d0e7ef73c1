"""The one typed config: dataclasses merged by OmegaConf from a YAML file and `key=value` overrides.

Every field is documented here, where it is declared, and nowhere else.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from launcher.config_checks import ConfigError, check as _check, check_finite, check_minimums, check_rewards, load_yaml


@dataclass
class ModelConfig:
    path: str = "runs/tiny-qwen2-vl"  # HF id or local folder of the policy (the reference starts from it too)
    build_tiny_if_missing: bool = True  # build the tiny random Qwen2-VL at `path` when the folder is absent
    tiny_seed: int = 0  # seed for the tiny model's weights and tokenizer
    min_pixels: int = 3136  # processor lower bound on image area (pixels), 56*56
    max_pixels: int = 401408  # processor upper bound on image area; 401408 = 512*28*28 as in the paper
    freeze_vision: bool = False  # train only the language model; the vision tower stays fixed
    lora_rank: int = 0  # LoRA (peft) adapters of this rank on the text decoder's projections, the rest frozen
    #                     (learner/lora.py); 0: off, every parameter trains
    lora_alpha: float = 16.0  # LoRA scaling numerator: the update is (lora_alpha / lora_rank) * B @ A
    lora_dropout: float = 0.0  # dropout on the adapters' input, in [0, 1) (> 0 makes the old-policy passes noisy)
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])  # module names in the text
    #                     decoder's blocks that get adapters; the vision tower is never adapted


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" or a loader of medvqa.loaders.SOURCES (jsonl, omnimedvqa, huatuo, hf)
    path: Optional[str] = None  # file or folder for non-synthetic sources (data root for omnimedvqa)
    train_modalities: list = field(default_factory=lambda: ["MRI"])  # modalities drawn for training
    eval_modalities: list = field(default_factory=lambda: ["MRI", "CT", "X-ray"])  # held-out sets, one per modality
    num_train: Optional[int] = None  # training records (paper: 600; None = all); public data: datasets' shuffle order
    num_eval_per_modality: int = 64  # held-out records per modality drawn from `path` (not used with eval_path)
    eval_path: Optional[str] = None  # evaluation file in the same format: all its usable records of eval_modalities
    #                                  are evaluated (else a held-out sample of `path`)
    test_fraction: float = 0.2  # share of images held out for evaluation when eval_path is not set
    question_types: list = field(default_factory=lambda: ["location", "count", "brighter"])  # synthetic only; also "contrast"
    num_options: int = 4  # options per synthetic question (2-10)
    shuffle_options: bool = True  # synthetic only: shuffle option order per question (false: fixed order)
    image_size: int = 56  # side of synthetic scans in pixels
    seed: int = 42  # seed for the synthetic draw, subset selection and shuffling


@dataclass
class RolloutConfig:
    num_workers: int = 1  # rollout actors, each owning one vLLM engine
    tensor_parallel_size: int = 1  # GPUs per engine (1 on CPU)
    group_size: int = 4  # G completions sampled per prompt
    prompts_per_step: int = 8  # prompts drawn per training step, shared across workers
    temperature: float = 1.0  # sampling temperature for training rollouts
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 512  # completion length cap; longer samples are marked "length"
    max_model_len: int = 2048  # vLLM context length (prompt + completion)
    gpu_memory_utilization: Optional[float] = None  # share of GPU memory vLLM may take (GPU profile); colocated, the
    #                                                  learner has the rest; None: rollout_workers.engine.GPU_MEMORY_SHARE
    #                                                  (0.9 with GPUs of its own, 0.4 colocated)
    kv_cache_gib: int = 1  # KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)
    enforce_eager: bool = True  # skip CUDA graph capture (faster start, slower decode)
    timeout_s: float = 0.0  # deadline of one generate or weight-receive call (0: derived from the work); a worker past it counts as dead
    engine_in_process: bool = False  # run vLLM's engine core and model inside the rollout worker's process (no
    #                                  per-token IPC: much faster for small models on CPU); false: vLLM's own processes


@dataclass
class LearnerConfig:
    num_ranks: int = 1  # learner processes (one per GPU on GPU)
    zero_stage: int = 2  # DeepSpeed ZeRO stage (learner.ds_config.ZERO_STAGES)
    precision: str = "fp32"  # parameter dtype (protocol.choices.PRECISIONS); fp16 is GPU only
    lr: float = 1e-6  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    lr_schedule: str = "constant"  # decay after warmup (learner.ds_config.LR_SCHEDULES)
    warmup_steps: int = 0  # linear learning-rate warmup in optimiser steps
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    micro_batch_size: int = 4  # samples per forward/backward pass
    mu: int = 1  # optimisation passes over each rollout batch (1 = on-policy, ratio stays 1)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    sync_every: int = 1  # push weights to the rollout workers every k optimiser steps
    offload_optimizer: bool = False  # ZeRO optimizer state offload to CPU memory
    zero3_persistence_threshold: int = 100000  # ZeRO-3 leaves smaller parameters whole on every rank; 0 splits all
    timeout_s: float = 0.0  # deadline of one train, weight-push, save or load call (0: derived from the work); a
    #                         rank past it is named, its stack written to <run>/faults/, and the run stops


@dataclass
class GRPOConfig:
    beta: float = 0.04  # weight of the k3 KL penalty to the frozen reference; 0 skips the reference
    clip_low: float = 0.2  # lower clip range: ratio >= 1 - clip_low
    clip_high: float = 0.2  # upper clip range: ratio <= 1 + clip_high (DAPO's clip-higher when larger)
    loss_agg: str = "seq_mean_token_mean"  # how token losses are averaged (learner.grpo.LOSS_AGGREGATIONS)
    normalize_std: bool = True  # divide group advantages by the group's std (Dr.GRPO: false)
    eps: float = 1e-4  # added to the group std, as in the paper's trainer
    tis_cap: float = 2.0  # each token's policy loss is weighted by min(pi_old / pi_sample, tis_cap), pi_sample
    #                       being the rollout engine's log-prob of the token (truncated importance sampling); 0: off
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more prompts in their place
    #                       (DAPO's group filter; launcher/dynamic_sampling.py)
    max_resample_rounds: int = 3  # with dynamic_sampling: rounds of extra prompts per step before training on fewer
    policy_loss: str = "ppo_clip"  # the policy term (learner.grpo.POLICY_LOSSES): ppo_clip (PPO's clipped ratio per
    #                       token) | gspo (one ratio per sequence; needs loss_agg seq_mean_token_mean; its paper clips
    #                       at clip_low 3e-4, clip_high 4e-4: set them, the 0.2 defaults seldom bind) | cispo (the
    #                       clipped ratio as a weight without gradient; MiniMax-M1: no lower bound, clip_low >= 1)


@dataclass
class RewardsConfig:
    weights: dict = field(default_factory=lambda: {"format": 1.0, "accuracy": 1.0})  # reward name -> weight


@dataclass
class TrainConfig:
    steps: int = 100  # optimiser steps (each on one rollout batch)
    seed: int = 0  # global seed (sampling, shuffling, initialisation)
    format_warmup_steps: int = 0  # supervised steps on format-only targets (random letter) before GRPO
    format_warmup_lr: float = 1e-3  # learning rate of the format warm-up
    eval_every: int = 0  # evaluate on the held-out sets every N steps (0: only at the end)
    eval_at_end: bool = True  # evaluate the final policy on the held-out sets
    save_every: int = 0  # save the policy (HF format, no optimiser state) every N steps (0: only the final one)
    checkpoint_every: int = 0  # full checkpoint (learner, optimiser, sampler, RNG) every N steps and at the end (0: none; a stop signal always writes one)
    keep_checkpoints: int = 2  # full checkpoints kept in <run>/checkpoints (0: all)
    resume: str = "auto"  # auto: resume from the run dir's latest checkpoint if any | a checkpoint or run dir | false
    max_staleness: int = 0  # 0: strictly on-policy (generate, train, sync in turn); k >= 1: the rollout workers sample
    #                         the next batches while the learner trains, each trained at most k weight versions
    #                         after the version it was sampled with (launcher/overlap.py)


@dataclass
class SFTConfig:
    """`medvlm-r1 sft`: supervised fine-tuning on the training records of `data` (the baseline of the
    paper's comparison). The paper publishes no SFT recipe: every default here is a guess. Model, data,
    learner (ranks, ZeRO, precision, micro-batches, schedule), evaluation and logging come from the other
    sections, as for `train`; see learner/sft.py for the targets."""
    target: str = "think_answer"  # think_answer: <think>fixed sentence</think><answer>B</answer> | letter: <answer>B</answer>
    epochs: int = 2  # passes over the training records; ignored when `steps` is set
    steps: Optional[int] = None  # optimiser steps (overrides `epochs`)
    batch_size: int = 16  # records per optimiser step, shared evenly by the learner ranks
    lr: float = 1e-5  # peak AdamW learning rate (schedule and warmup: learner.lr_schedule, learner.warmup_steps)


@dataclass
class LoggingConfig:
    run_dir: Optional[str] = None  # output folder; default runs/<name>-<time>
    name: str = "medvlm-r1"  # run name (W&B name and run-dir prefix)
    wandb: bool = True  # log to W&B (offline without an API key)
    wandb_project: str = "medvlm-r1"  # W&B project
    wandb_group: Optional[str] = None  # W&B group
    tags: list = field(default_factory=list)  # W&B tags
    sample_every: int = 10  # log a table of sample completions every N steps
    num_samples_logged: int = 4  # rows in each sample table
    progress_bar: bool = True  # tqdm progress bar on stderr
    overwrite: bool = False  # with train.resume=false, replace what a previous run left in run_dir


@dataclass
class ClusterConfig:
    device: str = "cpu"  # the profile (protocol.choices.DEVICES): device, dtype defaults, collective backend
    ray_address: Optional[str] = None  # join this Ray cluster (else RAY_ADDRESS, else start a local one)
    num_cpus: Optional[int] = None  # CPUs for a local Ray instance (None: all)
    cpus_per_actor: float = 1.0  # CPU share reserved per actor in its placement bundle
    sync_backend: str = "auto"  # weight sync transport (protocol.weight_update.SYNC_BACKENDS); auto: nccl on gpu, gloo on cpu (ipc on gpu when colocated)
    master_port: int = 0  # port for the learner's torch.distributed group (0: pick a free one)
    max_worker_restarts: int = 3  # dead or stuck rollout workers replaced per run before the run stops
    colocate: bool = False  # learner rank i and rollout engine i share one GPU (one bundle); the engine sleeps while the learner trains
    pin_cpus: bool = False  # CPU profile: bind each actor (a vLLM engine's processes included) to cpus_per_actor
    #                         cores of its own on its node, so learner and rollout really run side by side
    #                         (whole-core shares only; fractional shares are left to the OS)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


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
