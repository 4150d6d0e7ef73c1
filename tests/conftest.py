"""Shared fixtures: everything a test needs is built here, offline."""
import faulthandler
import os

import pytest

# vLLM's CPU engine needs a KV-cache budget; 1 GiB is plenty for the tiny model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The format warm-up behind `warm_model_dir`: 56x56 scans (4 image tokens), as in the tiny CPU config.
WARMUP_PIXELS, WARMUP_STEPS, WARMUP_LR = 3136, 150, 1e-2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2-VL checkpoint (model, tokenizer, processor), built once per test session."""
    from medvqa.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-qwen2-vl")
    return build_tiny_model(str(out), seed=0)


def warmup_records():
    """Two-option location questions and four-option questions of every default type, MRI style."""
    from medvqa.synthetic import make_synthetic_split

    return (make_synthetic_split("MRI", "train", 48, seed=0, question_types=["location"], num_options=2)
            + make_synthetic_split("MRI", "train", 48, seed=0, num_options=4))


@pytest.fixture(scope="session")
def warm_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after the format warm-up (learner/format_warmup.py): it writes the tags around a
    random letter, so its samples earn format and accuracy rewards of both values. Built once per session."""
    from learner.format_warmup import warmup_format

    out = tmp_path_factory.mktemp("warm-qwen2-vl")
    return warmup_format(tiny_model_dir, str(out), warmup_records(), WARMUP_STEPS, WARMUP_LR, 0, WARMUP_PIXELS,
                         WARMUP_PIXELS)


@pytest.fixture(scope="session")
def warmed_model(tiny_model_dir, tmp_path_factory):
    """The tiny model after a short format warm-up on two-option contrast questions: it writes the answer
    format with a random letter, so group rewards differ and GRPO steps really move the weights (a random
    model earns nothing). Built once per session (test_resume, test_overlap)."""
    from learner.format_warmup import warmup_format
    from medvqa.synthetic import make_synthetic_split

    records = make_synthetic_split("MRI", "train", 64, seed=0, question_types=["contrast"], num_options=2,
                                   shuffle_options=False)
    return warmup_format(tiny_model_dir, str(tmp_path_factory.mktemp("warmed")), records, 60, 1e-2, 0, 3136, 3136)


@pytest.fixture(scope="module", autouse=True)
def _ray_stopped_after_the_module():
    """A module that ran training in this process (`run_training` connects Ray and leaves it connected, as a
    library call should) does not hand its Ray session to the next module, which starts its own."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """A run logged to W&B inside this process leaves WANDB_SERVICE set, pointing at this process's wandb-core;
    a `medvlm-r1` subprocess started later would attach to it and could find its own resumed run ID "in use"
    by the process the test killed. Every command a test starts gets a W&B service of its own."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


# A slow test (engines, Ray, DeepSpeed ranks, Slurm) gets 900 s unless it sets its own limit: the global
# 300 s of pyproject.toml is for the rest, and a module's first slow test also pays for its fixtures.
SLOW_TIMEOUT_S = 900


# Vector extensions that change which float kernels torch (oneDNN, MKL) and vLLM's CPU backend pick.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile",
                "neon", "sve")


def machine_line() -> str:
    """The CPU model, its core count and the vector extensions it has: a trajectory that differs on
    another machine (float sums in another order) then says which machine it was."""
    import platform

    model, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
            if flags and model:
                break
    except OSError:
        pass
    have = [f for f in VECTOR_FLAGS if f in flags]
    model = model or platform.processor() or platform.machine()
    return f"cpu: {model}, {os.cpu_count()} cores, vector extensions: {' '.join(have) or 'none found'}"


def pytest_sessionstart(session):
    """Printed at every verbosity (`-q` hides pytest's own header), before the first test."""
    import torch

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(machine_line())
        reporter.write_line(f"torch {torch.__version__}: {torch.get_num_threads()} threads, "
                            f"kernels for {torch.backends.cpu.get_cpu_capability()}")


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests last to first: no test may rely on what an earlier one left")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    if config.getoption("--reverse-order"):
        items.reverse()


# pytest-timeout interrupts a test with SIGALRM, which Python only acts on between bytecodes: a main thread
# blocked inside C (a collective, a lock, a Ray call) never sees it and the suite stalls silently. A watchdog
# thread outside the interpreter ends the session this long after the test's own limit, printing every
# thread's stack, so a hang costs minutes and names itself.
HARD_GRACE_S = 120


def _terminal_fd(config) -> int:
    """The terminal's stderr: pytest's faulthandler plugin keeps a copy made before output capture."""
    from _pytest.faulthandler import fault_handler_stderr_fd_key

    return config.stash.get(fault_handler_stderr_fd_key, 2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or 0)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + HARD_GRACE_S, exit=True, file=_terminal_fd(item.config))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
