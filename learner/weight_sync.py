"""The sending end of weight sync: learner rank 0 broadcasts the policy to every rollout engine.

The learner is rank 0 of a process group of its own (not DeepSpeed's); each vLLM worker process
of each rollout engine joins at its own rank. With gloo (CPU) the wire format is the one in
`protocol.weight_update`: tensors packed into buckets that both ends cut from the same
`WeightUpdateMeta`, each preceded by a header that carries the version and a fingerprint, so a
mismatch is an error naming a parameter instead of a hang or silently wrong weights. With NCCL
(GPU) the receivers run vLLM's built-in `nccl` engine, so this end speaks its packed format
through vLLM's trainer-side helpers.

The control flow is the same for both: the driver calls `receive_weights(version, meta)` on every
rollout worker and `send(...)` here at the same time; both return once the update is loaded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from protocol import weight_update as wu

log = logging.getLogger(__name__)


@dataclass
class SendStats:
    version: int
    tensors: int
    bytes: int
    seconds: float


class WeightSender:
    """Rank 0 of the weight-sync group. The constructor blocks until every receiver has joined."""

    def __init__(self, master_addr: str, master_port: int, world_size: int, backend: str = "gloo",
                 bucket_bytes: int = wu.DEFAULT_BUCKET_BYTES, timeout_s: float = 1800.0):
        if world_size < 2:
            raise wu.WeightSyncError(f"weight sync group of size {world_size} has no receiver")
        self.backend, self.bucket_bytes, self.world_size = backend, bucket_bytes, world_size
        if backend == "gloo":
            self._group = wu.GlooGroup(master_addr, master_port, 0, world_size, timeout_s)
        elif backend == "nccl":
            # vLLM's own trainer-side rendezvous (a StatelessProcessGroup over a TCPStore, then
            # PyNccl), the counterpart of what its `nccl` engine does in the workers.
            from vllm.distributed.weight_transfer.nccl_common import trainer_init

            # vLLM's communicator makes a stream of its own current for this thread on its first use
            # (vllm.utils.torch_utils.current_stream); DeepSpeed's fp16 overflow check and the rest of the
            # step wait on the stream the learner ran on, so that one is made current again after the join.
            stream = torch.cuda.current_stream()
            self._group = trainer_init({"master_address": master_addr, "master_port": int(master_port),
                                        "world_size": world_size})
            torch.cuda.set_stream(stream)
            wu.require_live_communicator(self._group, "learner rank 0")
        else:
            raise wu.WeightSyncError(f"unknown weight sync backend {backend!r} for WeightSender (gloo or nccl; "
                                     "ipc is learner.ipc_sync.IpcWeightSender)")

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             meta: Optional[wu.WeightUpdateMeta] = None) -> SendStats:
        """Broadcast the tensors as update `version`; the receivers were given `meta` (Hugging Face names).

        `named_tensors` may be a generator that gathers ZeRO-3 shards one at a time (each tensor is
        copied before the next is asked for). Without `meta` the tensors are listed first to
        describe them, which suits small models and tests.
        """
        if self._group is None:
            raise wu.WeightSyncError("weight sender is closed")
        start = time.perf_counter()
        if meta is None:
            named_tensors = list(named_tensors)
            meta = wu.WeightUpdateMeta.from_tensors(named_tensors)
        if self.backend == "gloo":
            wu.send_update(self._group, named_tensors, meta, version, self.bucket_bytes)
        else:
            self._send_nccl(wu.checked(named_tensors, meta))
        stats = SendStats(version, len(meta.names), meta.total_bytes, time.perf_counter() - start)
        log.info("weight sync v%d: %d tensors, %.1f MB in %.2f s", version, stats.tensors,
                 stats.bytes / 1e6, stats.seconds)
        return stats

    def _send_nccl(self, pairs: Iterator[tuple[str, torch.Tensor]]) -> None:
        # The workers' nccl engine reads `packed` from its init info; the rollout workers set it
        # with vLLM's default buffer geometry, which these defaults match.
        from vllm.distributed.weight_transfer.packed_tensor import (
            DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            DEFAULT_PACKED_NUM_BUFFERS,
            packed_nccl_broadcast_producer,
        )

        # The producer holds a buffer's tensors until it packs them, and a ZeRO-3 gather is
        # released when the next parameter is asked for, so each tensor is copied as it comes.
        packed_nccl_broadcast_producer(iterator=pairs, group=self._group, src=0,
                                       post_iter_func=lambda item: item[1].detach().clone(),
                                       buffer_size_bytes=DEFAULT_PACKED_BUFFER_SIZE_BYTES,
                                       num_buffers=DEFAULT_PACKED_NUM_BUFFERS)
        torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self._group is not None and self.backend == "nccl":
            self._group.destroy()
        elif self._group is not None:
            self._group.close()
        self._group = None
