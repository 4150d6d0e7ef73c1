"""A gloo weight-transfer engine for vLLM: the receiving end of weight sync on CPU.

It mirrors vLLM's built-in `nccl` engine (vllm/distributed/weight_transfer/nccl_engine.py): the
learner is rank 0 of a process group of its own, every vLLM worker process joins at
`rank_offset + its rank`, and each update is a series of broadcasts from rank 0. The received
tensors go through vLLM's layerwise reload (`initialize_layerwise_reload` in
`update_weights`, `finalize_layerwise_reload` in `finish_weight_update`): on CPU vLLM
repacks linear weights after loading, so feeding `model.load_weights` directly fails. An update may
carry only part of the model (a frozen vision tower is not sent): the reload is then set up only on
the model's top-level parts that the update names, and the rest keeps its weights untouched.

A tied output head (Qwen2-VL-2B's `tie_word_embeddings`) is one parameter with the token embedding, sent
once under the embedding's name. The reload splits the two while it runs and puts the head back on the
updated tensor afterwards, but vLLM's CPU backend computes the logits through a copy of the head's weight
packed for oneDNN at load time, which the reload does not redo: the head is processed again here, or the
engine would sample from the starting checkpoint's head for ever.

vLLM creates the engine inside its own worker processes by name; `rollout_workers.vllm_plugin`
registers it there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.logger import init_logger

from protocol import weight_update as wu
from rollout_workers.vllm_plugin import RELOAD_LOGGER

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


def reload_roots(model, names) -> list:
    """The model's top-level parts that the checkpoint names reach (through the model's own name
    mapping), or [model] when a name maps outside them. A part left out keeps its weights: vLLM's
    reload would otherwise put each of its layers back with a "Failed to load weights" warning."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapped = mapper.apply_list(list(names)) if mapper is not None else list(names)
    children = {n: c for n, c in model.named_children() if any(True for _ in c.parameters())}
    roots = {name.split(".", 1)[0] for name in mapped}
    if not roots or not roots <= children.keys() or roots == children.keys():
        return [model]
    return _block_roots(model, mapped) or [children[r] for r in sorted(roots)]


def _block_roots(model, mapped: list[str]) -> list | None:
    """The modules holding the named layers (`...layers.3.self_attn` for `...layers.3.self_attn.q_proj.weight`)
    when every name lies inside an element of a layer list: an update of some projections only (LoRA's merged
    weights) then leaves the norms and embeddings beside them out of the reload, which would put each back with
    a "Failed to load weights" warning. None (whole top-level parts) when any name lies outside the blocks."""
    import torch

    paths = sorted({name.rsplit(".", 2)[0] for name in mapped if name.count(".") >= 2})
    if len(paths) == 0 or any(name.count(".") < 2 for name in mapped):
        return None
    try:
        blocks = {p: model.get_submodule(p) for p in paths}
        for p in paths:  # some ancestor must be a layer list (ModuleList)
            parts = p.split(".")
            if not any(isinstance(model.get_submodule(".".join(parts[:k])), torch.nn.ModuleList)
                       for k in range(1, len(parts))):
                return None
    except AttributeError:
        return None
    return [blocks[p] for p in paths if not any(p.startswith(q + ".") for q in paths)]


# What vLLM's reload says, once per update, of a head that shares the embedding's weight and so gets
# nothing under its own name (it follows the embedding instead).
_TIED_HEAD_WARNING = "ParallelLMHead: Failed to load weights"


def tied_heads(model) -> list:
    """The vocabulary layers (output heads) whose weight is an earlier one's (the token embedding's)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    first, tied = set(), []
    for module in model.modules():
        weight = getattr(module, "weight", None) if isinstance(module, VocabParallelEmbedding) else None
        if weight is None:
            continue
        if id(weight) in first:
            tied.append(module)
        first.add(id(weight))
    return tied


class _TiedHeadWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _TIED_HEAD_WARNING


@contextlib.contextmanager
def _tied_head_warning_expected(expected: bool):
    """Drops vLLM's per-update warning for a tied head while a reload finishes; only a model with a tied
    head is quieted, so a head that really failed to load on an untied model still warns."""
    log, quiet = logging.getLogger(RELOAD_LOGGER), _TiedHeadWarningFilter()
    if expected:
        log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


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
        self._reloading: list | None = None  # the modules of the update in progress
        self._tied_heads: list | None = None  # heads sharing the embedding's weight (read at the first update)

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        self.shutdown()  # a re-formed group replaces the old one
        rank = worker_group_rank(self.parallel_config, init_info.rank_offset)
        self.group = wu.GlooGroup(init_info.master_address, init_info.master_port, rank,
                                  init_info.world_size, init_info.timeout_s)
        logger.info("gloo weight transfer: joined as rank %d of %d", rank, init_info.world_size)

    def start_weight_update(self) -> None:
        # Which modules reload is known once the update's names arrive, in update_weights.
        self._reloading = None

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with _tied_head_warning_expected(bool(self._tied_heads)):
            for module in self._reloading or ():
                finalize_layerwise_reload(module, self.model_config)
        for head in self._tied_heads if self._reloading else ():
            head.quant_method.process_weights_after_loading(head)
        self._reloading = None

    def update_weights(self, update_info: dict) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        info = self.parse_update_info(update_info)
        if self._reloading is None:
            if self._tied_heads is None:  # read while the model is whole: the reload unties it
                self._tied_heads = tied_heads(self.model)
                if self._tied_heads:
                    logger.info("gloo weight transfer: the output head is tied to the token embedding; it "
                                "follows the embedding's updates (vLLM's '%s' for it is expected)",
                                _TIED_HEAD_WARNING)
            self._reloading = reload_roots(self.model, info.meta.names)
            for module in self._reloading:
                initialize_layerwise_reload(module)
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU;
        # gloo broadcasts here are blocking, so nothing is left to wait for.
        self.receive_weights(info)

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
