"""A gloo weight-transfer engine for vLLM: the receiving end of weight sync on CPU.

It mirrors vLLM's built-in `nccl` engine (vllm/distributed/weight_transfer/nccl_engine.py): the
learner is rank 0 of a process group of its own, every vLLM worker process joins at
`rank_offset + its rank`, and each update is a series of broadcasts from rank 0. The received
tensors go through vLLM's layerwise reload (`initialize_layerwise_reload` in
`start_weight_update`, `finalize_layerwise_reload` in `finish_weight_update`): on CPU vLLM
repacks linear weights after loading, so feeding `model.load_weights` directly fails.

vLLM creates the engine inside its own worker processes by name; `rollout_workers.vllm_plugin`
registers it there.
"""
from __future__ import annotations

import dataclasses
import time

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.logger import init_logger

from protocol import weight_update as wu

BACKEND = "gloo"
logger = init_logger(__name__)


@dataclasses.dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # group rank of this engine's first worker process
    world_size: int  # learner sender + every worker process of every rollout engine
    timeout_s: float = 1800.0


@dataclasses.dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list
    dtype_names: list
    shapes: list
    version: int
    bucket_bytes: int = wu.DEFAULT_BUCKET_BYTES

    def __post_init__(self):
        # The one place the wire form becomes the checked description again.
        self.meta = wu.WeightUpdateMeta.from_dict({"names": self.names, "dtype_names": self.dtype_names,
                                                   "shapes": self.shapes})


def worker_group_rank(parallel_config, rank_offset: int) -> int:
    """This worker process's rank in the sync group; the same rule as vLLM's NCCL engine."""
    per_replica = parallel_config.world_size  # tensor x pipeline parallel
    return parallel_config.data_parallel_index * per_replica + parallel_config.rank + rank_offset


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group: wu.GlooGroup | None = None

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        self.shutdown()  # a re-formed group replaces the old one
        rank = worker_group_rank(self.parallel_config, init_info.rank_offset)
        self.group = wu.GlooGroup(init_info.master_address, init_info.master_port, rank,
                                  init_info.world_size, init_info.timeout_s)
        logger.info("gloo weight transfer: joined as rank %d of %d", rank, init_info.world_size)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU;
        # gloo broadcasts here are blocking, so nothing is left to wait for.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise wu.WeightSyncError("gloo weight transfer: init_weight_transfer_engine was not called")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        meta, start = update_info.meta, time.perf_counter()
        with disable_mtp_completeness_check():
            wu.receive_update(self.group, meta, update_info.version, self.model.load_weights,
                              update_info.bucket_bytes, self.device)
        logger.info("gloo weight transfer: v%d, %d tensors, %.1f MB in %.2f s", update_info.version,
                    len(meta.names), meta.total_bytes / 1e6, time.perf_counter() - start)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
