"""The rollout worker: one vLLM engine that samples and scores groups of answers, and receives new weights.

A plain class: the driver wraps it with `ray.remote` (giving it CPUs or GPUs); tests use it
in-process. Weight sync uses vLLM's weight-transfer API (`init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`, run on every worker process of
the engine through `collective_rpc`) with the `gloo` engine of this package on CPU and vLLM's
`nccl` engine on GPU; the learner's `WeightSender` is the other end.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence, TypeVar

import rewards
from protocol.batch import RolloutBatch
from protocol.cpu_share import pin_this_process
from medvqa.prompt import load_processor, render_prompt
from medvqa.record import MedVQARecord, RecordError
from protocol.ipc_channel import PairChannel
from protocol.profile import check_torch_for
from protocol.weight_update import WeightSyncError
from rollout_workers import engine as eng

from protocol.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")


class RolloutWorkerError(RuntimeError):
    """A rollout worker that cannot go on (its engine died, or an update left it half-loaded)."""


class RolloutWorker:
    def __init__(self, cfg: Config, model_path: str, worker_index: int = 0, cpu_slot: Optional[int] = None):
        check_torch_for(cfg.cluster.device, f"rollout worker {worker_index}", need_gpu=True)
        self.cfg, self.index, self.model_path = cfg, worker_index, model_path
        # Before the engine starts: its processes inherit the binding, and its model runner binds its
        # threads to the same cores (instead of vLLM's own choice, which ignores the other actors).
        self.cores = pin_this_process(cpu_slot, int(cfg.cluster.cpus_per_actor))
        self.backend = eng.sync_backend(cfg)
        self._version = 0
        self._joined = False
        self._asleep: list[str] = []  # the engine's memory tags now released (sleep mode)
        self._channel: Optional[PairChannel] = None  # colocated (ipc): the learner rank beside this engine
        self._ipc_version: Optional[str] = None  # the version the learner's last ipc update carried
        self._broken: Optional[str] = None  # why the engine can no longer be trusted
        rewards.check_weights(cfg.rewards.weights)  # an unknown reward fails here, not at step 1
        self.processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
        self._guard("start-up", lambda: eng.check_plugin(self.backend))
        eng.set_engine_env(cfg, self.cores)
        start = time.perf_counter()
        self.llm = self._guard("start-up", lambda: _new_llm(eng.engine_kwargs(cfg, model_path, worker_index)))
        eng.watch_engine(self.llm)
        eng.quiet_in_process_engine(cfg)
        log.info("rollout worker %d: engine up in %.1f s (%s, weight sync over %s%s)", worker_index,
                 time.perf_counter() - start, eng.engine_dtype(cfg), self.backend, eng.model_runner(self.llm, cfg))

    # ---- generation -------------------------------------------------------------------------
    def generate(self, records: Sequence[MedVQARecord], seed: int) -> RolloutBatch:
        """G = rollout.group_size scored samples per record, laid out group by group."""
        start = time.perf_counter()
        records = list(records)
        self._wake(self._asleep)
        prompts = [eng.image_prompt(r, self.processor) for r in records]
        params = [eng.sampling_params(self.cfg.rollout, s) for s in eng.request_seeds(seed, len(records))]
        outs = self._run(f"generate on records {_ids(records)}",
                         lambda: self.llm.generate(prompts, params, use_tqdm=False))
        batch = self._to_batch(records, outs)
        batch.generate_s = time.perf_counter() - start
        return batch

    def _to_batch(self, records: list[MedVQARecord], outs) -> RolloutBatch:
        g, weights = self.cfg.rollout.group_size, self.cfg.rewards.weights
        comp_ids, texts, logprobs, finish = [], [], [], []
        scores: dict[str, list[float]] = {name: [] for name in weights}
        totals = []
        for record, out in zip(records, outs):
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != g:
                raise RolloutWorkerError(f"rollout worker {self.index}: record {record.id!r} got "
                                         f"{len(samples)} samples, expected {g}")
            for c, text in zip(samples, eng.decode(self.processor.tokenizer, [c.token_ids for c in samples])):
                comp_ids.append(list(c.token_ids))
                texts.append(text)
                logprobs.append(eng.sampled_logprobs(c.token_ids, c.logprobs))
                finish.append(self._finish_reason(record, c.finish_reason))
                parts, total = rewards.score(text, record.answer, record.options, weights)
                for name, value in parts.items():
                    scores[name].append(value)
                totals.append(total)
        return RolloutBatch(record_ids=[r.id for r in records], group_size=g, prompt_token_ids=[list(o.prompt_token_ids) for o in outs],
                            completion_token_ids=comp_ids, completion_texts=texts, sampling_logprobs=logprobs,
                            rewards=scores, total_rewards=totals, finish_reasons=finish,
                            weight_version=self._version)

    def _finish_reason(self, record: MedVQARecord, reason: Optional[str]) -> str:
        if reason not in ("stop", "length"):
            raise RolloutWorkerError(f"rollout worker {self.index}: a sample for record {record.id!r} "
                                     f"ended with {reason!r} (aborted by the engine)")
        return reason

    def generate_greedy(self, records: Sequence[MedVQARecord], max_new_tokens: int) -> list[tuple[str, int, str]]:
        """(completion text, number of tokens, finish reason) per record, greedy: the evaluation protocol."""
        records = list(records)
        self._wake(self._asleep)
        prompts = [eng.image_prompt(r, self.processor) for r in records]
        outs = self._run(f"greedy generation on records {_ids(records)}",
                         lambda: self.llm.generate(prompts, eng.greedy_params(max_new_tokens), use_tqdm=False))
        texts = eng.decode(self.processor.tokenizer, [o.outputs[0].token_ids for o in outs])
        return [(text, len(o.outputs[0].token_ids), self._finish_reason(r, o.outputs[0].finish_reason))
                for text, r, o in zip(texts, records, outs)]

    def completion_logprobs(self, record: MedVQARecord, completion_token_ids: Sequence[int]) -> list[float]:
        """The engine's log-prob of each token of a fixed completion after the record's prompt.

        The prompt goes in as token ids with one image placeholder, which vLLM expands exactly as
        for a text prompt; the completion's log-probs are the tail of the prompt log-probs.
        """
        from vllm import SamplingParams

        completion = [int(t) for t in completion_token_ids]
        if not completion:
            return []
        self._wake(self._asleep)
        text = render_prompt(record, self.processor)
        prompt = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        request = {"prompt_token_ids": prompt + completion, "multi_modal_data": {"image": record.load_image()}}
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        (out,) = self._run(f"scoring a completion of record {record.id!r}",
                           lambda: self.llm.generate([request], params, use_tqdm=False))
        ids, lps = out.prompt_token_ids, out.prompt_logprobs
        k = len(completion)
        if list(ids[-k:]) != completion:
            raise RolloutWorkerError(f"rollout worker {self.index}: the engine changed the completion tokens "
                                     f"of record {record.id!r}")
        return [float(lps[j][ids[j]].logprob) for j in range(len(ids) - k, len(ids))]

    # ---- weight sync ------------------------------------------------------------------------
    def init_weight_sync(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                         backend: str) -> None:
        """Join the learner's weight-sync group; blocks until the learner (rank 0) and every engine join.
        Colocated (ipc), pair up with learner rank `worker_index` instead and take its settings."""
        if backend != self.backend:
            raise WeightSyncError(f"rollout worker {self.index}: engine was built for {self.backend!r} weight "
                                  f"sync, asked to join a {backend!r} group")
        if self._joined:  # the group is re-formed after another worker was replaced: leave the old one
            self._run("leaving the old weight-sync group",
                      lambda: self.llm.collective_rpc("shutdown_weight_transfer_engine"))
        if backend == "ipc":
            self._channel = PairChannel(master_addr, master_port, self.index, host=False)
            self._channel.serve(self._ipc_call, until="init_weight_transfer_engine")
        else:
            info = {"master_address": master_addr, "master_port": int(master_port),
                    "rank_offset": int(rank_offset), "world_size": int(world_size)}
            if backend == "nccl":
                eng.check_nccl(f"rollout worker {self.index}")
                info["packed"] = True  # the learner's WeightSender sends vLLM's packed format
            self._run("joining the weight-sync group",
                      lambda: self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": info}))
        self._joined = True

    def receive_weights(self, version: int, update_meta: dict) -> int:
        """Receive update `version` (blocking until it is loaded), then report it in every batch.

        `update_meta` is the learner's description in wire form (`WeightUpdateMeta.to_dict()`); it is
        passed on to the engine unchanged, which parses it once. Colocated (ipc), the learner rank
        beside this engine drives the update through the channel, chunk by chunk."""
        if self._broken:
            raise RolloutWorkerError(f"rollout worker {self.index}: cannot take weight update v{version}: "
                                     f"{self._broken}")
        start = time.perf_counter()
        try:
            self._wake(["weights"])
            if self.backend == "ipc":
                self._receive_ipc(version)
            else:
                self._receive_broadcast(version, update_meta)
        except Exception as exc:
            # Layerwise reload had moved the parameters aside; a failed update leaves no usable model.
            self._broken = f"weight update v{version} failed: {exc}"
            raise RolloutWorkerError(f"rollout worker {self.index}: {self._broken}") from exc
        # KV blocks and vision-encoder outputs computed with the old weights must not be reused
        # (without this, a prompt seen before the update is scored with stale KV and image features).
        if not self.llm.reset_prefix_cache():
            raise RolloutWorkerError(f"rollout worker {self.index}: could not drop the prefix cache after "
                                     f"weight update v{version}")
        self.llm.llm_engine.reset_encoder_cache()
        self._version = int(version)
        log.info("rollout worker %d: weights v%d loaded in %.2f s", self.index, version, time.perf_counter() - start)
        return self._version

    def _receive_broadcast(self, version: int, update_meta: dict) -> None:
        info = dict(update_meta)
        if self.backend == "gloo":
            info["version"] = int(version)
        self._run(f"starting weight update v{version}", lambda: self.llm.collective_rpc("start_weight_update"))
        self.llm.collective_rpc("update_weights", kwargs={"update_info": info})
        self.llm.collective_rpc("finish_weight_update")

    def _receive_ipc(self, version: int) -> None:
        if self._channel is None:
            raise WeightSyncError(f"rollout worker {self.index}: receive_weights before init_weight_sync")
        self._ipc_version = None
        self._run(f"weight update v{version}",
                  lambda: self._channel.serve(self._ipc_call, until="finish_weight_update"))
        if self._ipc_version != str(version):
            raise WeightSyncError(f"rollout worker {self.index}: the learner sent update v{self._ipc_version}, "
                                  f"the driver asked for v{version}")

    def _ipc_call(self, method: str, payload) -> None:
        """One call of vLLM's weight-sync client protocol, replayed on this engine's workers."""
        if method == "init_weight_transfer_engine":
            self.llm.collective_rpc(method, kwargs={"init_info": payload})
        elif method == "update_weights":
            self.llm.collective_rpc(method, kwargs={"update_info": eng.ipc_update_info(payload)})
        elif method in ("start_weight_update", "finish_weight_update"):
            self.llm.collective_rpc(method)
            self._ipc_version = payload if method == "finish_weight_update" else None
        else:
            raise WeightSyncError(f"rollout worker {self.index}: unknown weight-sync call {method!r}")

    # ---- sleep mode (colocated on GPU) ------------------------------------------------------
    def sleep(self) -> bool:
        """Release the engine's GPU memory (weights to host memory, KV cache dropped) while the learner
        beside it trains; it wakes for the next update or generation. A no-op unless the engine runs
        in sleep mode (rollout_workers.engine.sleeps). Returns whether it sleeps."""
        if not eng.sleeps(self.cfg):
            return False
        if not self._asleep:
            self._run("going to sleep", lambda: self.llm.sleep(level=1))
            self._asleep = ["weights", "kv_cache"]
        return True

    def _wake(self, tags: Sequence[str]) -> None:
        tags = [t for t in tags if t in self._asleep]
        if tags:
            self._run(f"waking up {', '.join(tags)}", lambda: self.llm.wake_up(tags=tags))
            self._asleep = [t for t in self._asleep if t not in tags]

    def weight_version(self) -> int:
        return self._version

    def process_ids(self) -> list[int]:
        """This actor's pid and those of every process below it (vLLM's engine processes): what a stuck
        or half-dead worker is killed by (an engine process may outlive a killed actor otherwise)."""
        import psutil

        return [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    # ---- errors -----------------------------------------------------------------------------
    def _run(self, what: str, fn: Callable[[], T]) -> T:
        if self._broken:
            raise RolloutWorkerError(f"rollout worker {self.index}: cannot run {what}: {self._broken}")
        if self.llm is None:
            raise RolloutWorkerError(f"rollout worker {self.index}: cannot run {what}: it was shut down")
        return self._guard(what, fn)

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return fn()
        except (RecordError, RolloutWorkerError, WeightSyncError):
            raise
        except EngineDeadError as exc:
            self._broken = "its vLLM engine died"
            raise RolloutWorkerError(f"rollout worker {self.index}: vLLM engine died during {what}: {exc}") from exc
        except Exception as exc:
            raise RolloutWorkerError(f"rollout worker {self.index}: {what} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc


def _new_llm(kwargs: dict):
    from vllm import LLM

    return LLM(**kwargs)


def _ids(records: Sequence[MedVQARecord], limit: int = 8) -> str:
    ids = [r.id for r in records[:limit]]
    return ", ".join(map(repr, ids)) + (f" and {len(records) - limit} more" if len(records) > limit else "")
