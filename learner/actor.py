"""One learner rank: the policy under DeepSpeed ZeRO, trained by GRPO on rollout batches.

A plain class; the driver wraps it with `ray.remote`, one actor per rank. Ranks form their own
torch.distributed group (DeepSpeed's), separate from the group that carries weights to the
rollout workers, which only rank 0 joins.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional

import torch

from learner import ds_config, lora, zero_params
from learner.hf_export import save_hf_checkpoint
from learner.model_inputs import collate_samples, encode_prompts
from learner.policy import PolicyModule
from learner.sft import sft_micro_batches, sft_step
from learner.train_step import StepPlan, completion_logprobs_of, run_train_step
from protocol.profile import check_torch_for
from protocol.batch import RolloutBatch
from protocol.cpu_share import pin_this_process
from medvqa.record import MedVQARecord

from protocol.config import Config


def _init_process_group(cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int) -> str:
    """The ranks' own group. Each Ray actor sees only its own GPU, hence LOCAL_RANK 0 on GPU."""
    import deepspeed

    gpu = cfg.cluster.device == "gpu"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0" if gpu else str(rank),
                      LOCAL_WORLD_SIZE="1" if gpu else str(world_size),
                      MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port))
    backend = "nccl" if gpu else "gloo"
    if not gpu:
        _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=rank, world_size=world_size)
    return backend


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about 1-2 min on 2 cores) that only
    its inference all-reduce uses; training reduces through gloo. The build holds a file lock under
    ~/.cache/torch_extensions: a rank killed mid-build (a timeout, a fault test, Ctrl-C) leaves the lock behind
    and every later DeepSpeed start on the machine waits on it forever. Marking the op incompatible skips it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _load_hf_model(model_path: str, dtype: torch.dtype):
    from transformers import Qwen2VLForConditionalGeneration

    try:
        return Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load a Qwen2-VL model from {model_path}: {exc}") from exc


# The tag (sub-folder) of DeepSpeed's checkpoint inside a run checkpoint.
_STATE_TAG = "deepspeed"


class LearnerRank:
    def __init__(self, cfg: Config, model_path: str, rank: int, world_size: int, master_addr: str, master_port: int,
                 cpu_slot: Optional[int] = None):
        import deepspeed
        from medvqa.prompt import load_processor

        check_torch_for(cfg.cluster.device, f"learner rank {rank}", need_gpu=True)
        self.cores = pin_this_process(cpu_slot, int(cfg.cluster.cpus_per_actor))
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self.backend = _init_process_group(cfg, rank, world_size, master_addr, master_port)
        self.processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
        dtype = ds_config.torch_dtype(cfg.learner.precision)
        hf = _load_hf_model(model_path, dtype)
        hf.config.use_cache = False
        if cfg.learner.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.freeze_vision:
            hf.model.visual.requires_grad_(False)
        self.param_names = zero_params.checkpoint_names(hf)  # of the unwrapped model: what leaves the learner
        m = cfg.model
        # LoRA: only the adapters train (and sit in the optimiser); the vision tower is frozen with the rest.
        self.peft = lora.apply_lora(hf, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets) \
            if m.lora_rank > 0 else None
        self.vision_frozen = m.freeze_vision or self.peft is not None
        optimizer = ds_config.make_optimizer(hf.parameters(), cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=PolicyModule(hf), optimizer=optimizer, lr_scheduler=ds_config.make_scheduler(optimizer, cfg),
            config=ds_config.deepspeed_config(cfg, world_size))
        self.engine.train()  # from_pretrained leaves the model in eval mode, where checkpointing is off
        self.device = self.engine.device
        self.reference = self._make_reference(model_path, dtype) if cfg.grpo.beta > 0 else None
        self.weight_sender = None
        self.sync_backend = None
        self._update_meta = None
        self._lora_sync = None  # LoRA: what a weight update carries (learner/lora.py), built on first use

    def _make_reference(self, model_path: str, dtype: torch.dtype):
        """The frozen reference for the KL term.

        Under LoRA it is this rank's own policy with its adapters switched off: the frozen base, exactly
        the starting policy, at no extra memory (learner/lora.py).

        Under ZeRO-3 it is an optimiser-less ZeRO-3 engine, partitioned across the ranks like the
        policy; otherwise a whole copy per rank. With model.freeze_vision both vision towers hold
        the same weights, so the reference's passes take the policy's image features.
        """
        import deepspeed

        if self.peft is not None:
            return lora.AdapterlessReference(self.engine, self.peft)
        ref = PolicyModule(_load_hf_model(model_path, dtype)).eval().requires_grad_(False)
        if self.cfg.learner.zero_stage == 3:
            engine, *_ = deepspeed.initialize(model=ref, config=ds_config.reference_config(self.cfg))
            engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
            return engine
        return ref.to(self.device)

    @property
    def hf_model(self):
        return self.engine.module.hf

    # ---- training ---------------------------------------------------------------------------------

    def train_on(self, batch: RolloutBatch, records: list[MedVQARecord]) -> dict[str, float]:
        """One rollout shard (whole groups) and its prompts' records, in the batch's order:
        learner.mu optimiser steps, each over all micro-batches."""
        t0 = time.perf_counter()
        batch.check_records(records)
        plan = self._plan(batch, records)
        metrics = run_train_step(self.engine, self.reference, plan, self.cfg, self.world_size)
        self._release_cached_memory()
        metrics["time/learner_s"] = time.perf_counter() - t0
        return metrics

    def _release_cached_memory(self) -> None:
        if self.cfg.cluster.colocate and self.device.type == "cuda":
            # Activations and gathered weights stay cached by torch's allocator otherwise; the engine beside
            # this rank needs that memory back for its KV cache.
            torch.cuda.empty_cache()

    def _plan(self, batch: RolloutBatch, records: list[MedVQARecord]) -> StepPlan:
        if batch.num_samples == 0:
            raise ValueError("train_on got an empty rollout shard")
        prompts = encode_prompts(records, batch.prompt_token_ids, self.processor)
        size, g = self.cfg.learner.micro_batch_size, batch.group_size
        pad = self.processor.tokenizer.pad_token_id or 0
        chunks = [list(range(s, min(s + size, batch.num_samples))) for s in range(0, batch.num_samples, size)]
        micro = [collate_samples(prompts, [i // g for i in idx], [batch.completion_token_ids[i] for i in idx],
                                 pad, prompt_keys=range(len(prompts))) for idx in chunks]
        # Recomputed activations drop the prompt's cache, which the shared pass continues from.
        return StepPlan(batch=batch, prompts=prompts, micro_batches=micro, sample_indices=chunks,
                        device=self.device, freeze_vision=self.vision_frozen,
                        share_prompts=not self.cfg.learner.gradient_checkpointing)

    def train_sft(self, records: list[MedVQARecord], target: str) -> dict[str, float]:
        """One supervised optimiser step on this rank's records (see learner/sft.py); every rank
        must get as many records, so that ZeRO's collectives stay in step."""
        if not records:
            raise ValueError("train_sft got no records")
        t0 = time.perf_counter()
        micro = sft_micro_batches(records, self.processor, target, self.cfg.learner.micro_batch_size)
        metrics = sft_step(self.engine, micro, self.device, self.world_size,
                           watch_gradients=self.cfg.learner.precision != "fp16")
        metrics["time/learner_s"] = time.perf_counter() - t0
        return metrics

    def completion_logprobs(self, record: MedVQARecord, prompt_token_ids: list[int],
                            completion_token_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Log-probs of one completion's tokens under the current policy (every rank must call it
        under ZeRO-3). Temperature 1 gives the raw distribution, as the engine reports by default."""
        prompts = encode_prompts([record], [prompt_token_ids], self.processor)
        batch = collate_samples(prompts, [0], [completion_token_ids], self.processor.tokenizer.pad_token_id or 0)
        return completion_logprobs_of(self.engine, batch, self.device, temperature)[0]

    # ---- weights out ------------------------------------------------------------------------------

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF checkpoint name, whole tensor) per parameter that trains: a frozen one (model.freeze_vision)
        never changes, so the engines keep the copy they loaded. Under LoRA: the merged weights of the
        wrapped modules (learner/lora.py). Under ZeRO-3 all ranks must iterate it together, and a tensor
        is valid only until the next one is asked for."""
        if self.peft is not None:
            return lora.iter_sync(self._lora_sync_tensors())
        return zero_params.full_named_parameters(self.hf_model, self.param_names, trainable_only=True)

    def _lora_sync_tensors(self) -> list:
        if self._lora_sync is None:
            self._lora_sync = lora.sync_tensors(self.hf_model, self.param_names)
        return self._lora_sync

    def process_ids(self) -> list[int]:
        """This rank's pid and those below it: what a stuck rank is read (py-spy) and killed by."""
        import psutil

        return [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]

    def weights_checksum(self) -> float:
        """A fingerprint of the weights (a collective under ZeRO-3); it moves with any update."""
        return zero_params.weights_checksum(self.hf_model)

    def save(self, out_dir: str) -> str:
        """The policy in Hugging Face format with the starting checkpoint's processor files; under LoRA
        the merged model, and the adapter alone in `adapter/` (peft's format, over the starting checkpoint).
        Every rank must call it; rank 0 writes."""
        if self.peft is None:
            state = zero_params.full_state_dict(self.hf_model, self.rank)
        else:
            state = lora.merged_state_dict(self.hf_model, self.rank)
            with zero_params.gathered(lora.adapter_parameters(self.hf_model)):
                if self.rank == 0:
                    self.peft.save_pretrained(os.path.join(out_dir, lora.ADAPTER_DIR))
        if self.rank == 0:
            save_hf_checkpoint(self.hf_model, out_dir, self.model_path, state_dict=state)
        if self.world_size > 1:
            torch.distributed.barrier()
        return str(out_dir)

    # ---- full training state (resume) --------------------------------------------------------------

    def save_state(self, out_dir: str) -> str:
        """DeepSpeed's own checkpoint of this rank (model, optimiser and scheduler, the ZeRO
        partitions as they are) and its RNG state; under LoRA the frozen base is left out (it is the starting
        checkpoint). Every rank must call it, on one shared folder."""
        self.engine.save_checkpoint(out_dir, tag=_STATE_TAG, client_state={"torch_rng": torch.get_rng_state()},
                                    save_latest=False, exclude_frozen_parameters=self.peft is not None)
        if self.world_size > 1:
            torch.distributed.barrier()
        return out_dir

    def load_state(self, in_dir: str) -> int:
        """Restore what `save_state` wrote (every rank); returns the optimiser steps taken so far."""
        path, client = self.engine.load_checkpoint(in_dir, tag=_STATE_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=self.peft is None)
        if path is None:
            raise FileNotFoundError(f"learner rank {self.rank}: no DeepSpeed checkpoint in {in_dir}/{_STATE_TAG}")
        torch.set_rng_state(client["torch_rng"])
        self._update_meta = None
        return int(self.engine.global_steps)

    # ---- weight sync (the sending side lives in learner/weight_sync.py) ---------------------------

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight-sync group as its rank 0 (blocking until every receiver joins);
        the other ranks only help gather under ZeRO-3. With ipc (colocated) every rank joins, paired
        with the engine on its own GPU."""
        self.sync_backend = backend
        if self.weight_sender is not None:  # the group is re-formed after a rollout worker was replaced
            self.weight_sender.close()
            self.weight_sender = None
        if backend == "ipc":
            from learner.ipc_sync import IpcWeightSender

            self.weight_sender = IpcWeightSender(master_addr, master_port, self.rank, self._meta(),
                                                 self.named_parameters_for_sync)
            return
        if self.rank != 0:
            return
        from learner.weight_sync import WeightSender

        self.weight_sender = WeightSender(master_addr, master_port, world_size, backend)

    def weight_update_meta(self) -> dict:
        """The description of what `push_weights` sends (HF checkpoint names, dtypes, full shapes, in
        order, of the parameters that train) in its wire form, the plain dict every receiver is handed
        unchanged. Read from the parameters' descriptions, no gather needed."""
        return self._meta().to_dict()

    def _meta(self):
        from protocol.weight_update import WeightUpdateMeta, dtype_name

        if self._update_meta is None and self.peft is not None:
            items = self._lora_sync_tensors()
            self._update_meta = WeightUpdateMeta(
                tuple(t.name for t in items), tuple(dtype_name(t.base.dtype) for t in items),
                shapes=tuple(tuple(t.base.ds_shape) if zero_params.is_partitioned(t.base) else tuple(t.base.shape)
                             for t in items))
        if self._update_meta is None:
            names, dtypes, shapes = [], [], []
            for name, p in self.hf_model.named_parameters():
                if not p.requires_grad:
                    continue
                names.append(self.param_names[name])
                dtypes.append(dtype_name(p.dtype))
                shapes.append(tuple(p.ds_shape) if zero_params.is_partitioned(p) else tuple(p.shape))
            self._update_meta = WeightUpdateMeta(tuple(names), tuple(dtypes), shapes=tuple(shapes))
        return self._update_meta

    def push_weights(self, version: int) -> None:
        """Gather the full parameters (every rank takes part under ZeRO-3) and let rank 0 send them.
        The driver calls it on all ranks while the rollout workers receive."""
        if self.sync_backend == "ipc":  # every rank sends, to the engine on its own GPU
            self.weight_sender.send(version)
            self._release_cached_memory()  # the packed buffers of the update
            return
        pairs = self.named_parameters_for_sync()
        if self.rank != 0:
            for _ in pairs:  # the gathers are collectives: keep in step with rank 0
                pass
            return
        if self.weight_sender is None:
            raise RuntimeError("push_weights before init_weight_sync on learner rank 0")
        try:
            self.weight_sender.send(pairs, version, meta=self._meta())
        except BaseException:
            for _ in pairs:  # a failed send (a receiver died) must not leave the other ranks in a gather
                pass
            raise
