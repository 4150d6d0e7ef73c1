"""vLLM plugin: registers the `gloo` weight-transfer backend in every vLLM process.

vLLM builds the weight-transfer engine by name inside its worker processes, which it spawns
itself, so registering in the caller's process is not enough. pyproject.toml declares
`register` under the `vllm.general_plugins` entry point, which vLLM runs in each of its
processes. It imports only the factory: the engine module loads when an engine is built.
"""
from __future__ import annotations

GLOO_BACKEND = "gloo"
ENTRY_POINT = "medvlm_gloo_weight_transfer"  # its name in pyproject.toml


def register() -> None:
    """Idempotent: vLLM may load plugins more than once per process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            GLOO_BACKEND, "rollout_workers.gloo_transfer", "GlooWeightTransferEngine")
