"""Shared fixtures: everything a test needs is built here, offline."""
import os

import pytest

# vLLM's CPU engine needs a KV-cache budget; 1 GiB is plenty for the tiny model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2-VL checkpoint (model, tokenizer, processor), built once per test session."""
    from medvqa.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-qwen2-vl")
    return build_tiny_model(str(out), seed=0)


# A slow test (engines, Ray, DeepSpeed ranks, Slurm) gets 900 s unless it sets its own limit: the global
# 300 s of pyproject.toml is for the rest, and a module's first slow test also pays for its fixtures.
SLOW_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
