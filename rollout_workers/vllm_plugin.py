"""vLLM plugin: registers the `gloo` weight-transfer backend in every vLLM process.

vLLM builds the weight-transfer engine by name inside its worker processes, which it spawns
itself, so registering in the caller's process is not enough. pyproject.toml declares
`register` under the `vllm.general_plugins` entry point, which vLLM runs in each of its
processes. It imports only the factory: the engine module loads when an engine is built.
"""
from __future__ import annotations

import logging

GLOO_BACKEND = "gloo"
# Layers that hold only values computed at start-up (rotary cos/sin caches, the image mean/std of
# the processor), never checkpoint weights: vLLM's reload path warns on every update that none
# arrived for them, which is expected.
_WEIGHTLESS_LAYERS = ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm")
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
ENTRY_POINT = "medvlm_gloo_weight_transfer"  # its name in pyproject.toml


class _WeightlessLayerFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith(": Failed to load weights") and message.split(":")[0] in _WEIGHTLESS_LAYERS)


def register() -> None:
    """Idempotent: vLLM may load plugins more than once per process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    reload_log = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, _WeightlessLayerFilter) for f in reload_log.filters):
        reload_log.addFilter(_WeightlessLayerFilter())

    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            GLOO_BACKEND, "rollout_workers.gloo_transfer", "GlooWeightTransferEngine")
