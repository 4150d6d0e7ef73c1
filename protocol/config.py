"""The config schema: one dataclass per section, every field documented where it is declared and nowhere
else. It imports nothing of the project, so every package can name it (`protocol.config.Config`);
loading a YAML file with `key=value` overrides and validating the values is launcher/config.py's work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    kv_cache_gib: float = 1  # KV cache size on CPU in GiB (VLLM_CPU_KVCACHE_SPACE when whole; a fraction such as 0.25
    #                          goes to vLLM as kv_cache_memory_bytes)
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
    zero_bucket_elements: int = 500_000_000  # DeepSpeed's reduce (and all-gather) bucket, in elements (its own
    #                         default); ZeRO-3 holds one whole bucket per rank, filled up to the model's size: 2 GB
    #                         in fp32 at this default, so a memory-tight CPU run lowers it
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
