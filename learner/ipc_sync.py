"""The sending end of colocated weight sync: every learner rank feeds the engine on its own GPU by CUDA IPC.

With cluster.colocate, learner rank i and rollout worker i share a GPU. Each rank runs vLLM's own
trainer-side IPC engine (`IPCTrainerWeightTransferEngine`, packed: the parameters are copied into one
reusable GPU buffer, chunk by chunk, and the engine maps that buffer), with a `ChannelClient` from
`protocol.ipc_channel` as its client: the calls reach rollout worker i, which replays them on its
engine. Under ZeRO-3 all ranks gather every parameter together (the source is iterated on every rank,
in the same order); every rank is a sender, to its own engine, so nothing travels between GPUs.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import torch

from protocol.ipc_channel import ChannelClient, PairChannel
from protocol.weight_update import WeightUpdateMeta

log = logging.getLogger(__name__)


def _weight_source(meta: WeightUpdateMeta, pairs: Callable[[], Iterator[tuple[str, torch.Tensor]]]):
    """A vLLM `WeightSource` over the learner's (gathered) parameters, described by `meta`."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class LearnerWeights(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(n, getattr(torch, d), tuple(s))
                    for n, d, s in zip(meta.names, meta.dtype_names, meta.shapes)]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return pairs()

    return LearnerWeights()


class IpcWeightSender:
    """Learner rank `pair`'s sender; rank 0 hosts the channel's store. The constructor returns once the
    engine beside it has accepted the transfer's settings."""

    def __init__(self, master_addr: str, master_port: int, pair: int, meta: WeightUpdateMeta,
                 pairs: Callable[[], Iterator[tuple[str, torch.Tensor]]], timeout_s: float = 1800.0):
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerWeightTransferEngine
        from vllm.distributed.weight_transfer.packed_tensor import DEFAULT_PACKED_BUFFER_SIZE_BYTES

        self.meta = meta
        self.client = ChannelClient(PairChannel(master_addr, master_port, pair, host=pair == 0, timeout_s=timeout_s))
        # Built directly rather than through trainer_init: there, only rank 0 is a sender, to one engine;
        # here each rank is the sole sender to the engine on its own GPU.
        # The buffer must hold the largest tensor (an embedding can pass vLLM's 1 GiB default).
        largest = max(meta.nbytes(i) for i in range(len(meta.names)))
        self.engine = IPCTrainerWeightTransferEngine(
            client=self.client, source=_weight_source(meta, pairs), is_sender=True, packed=True,
            packed_buffer_size_bytes=max(DEFAULT_PACKED_BUFFER_SIZE_BYTES, largest))
        self.client.init_weight_transfer_engine({"packed": True})

    def send(self, version: int) -> float:
        """One full update as `version`; returns the seconds it took."""
        start = time.perf_counter()
        self.client.version = str(int(version))
        self.engine.send_weights()
        seconds = time.perf_counter() - start
        log.info("ipc weight sync v%d: %d tensors, %.1f MB in %.2f s", version, len(self.meta.names),
                 self.meta.total_bytes / 1e6, seconds)
        return seconds

    def close(self) -> None:
        self.engine.shutdown()
        self.client.channel.close()
