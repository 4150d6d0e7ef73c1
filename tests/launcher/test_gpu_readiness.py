"""Start-up checks of the GPU profile, run on CPU: a CPU-only torch under cluster.device=gpu, a disabled
NCCL communicator (vLLM's real one, built here where libnccl cannot load), the sync backend rules, and the
two ports of a run."""
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher import cluster
from launcher.config import ConfigError, load_config
from protocol import weight_update as wu
from protocol.profile import ProfileError, check_torch_for

REPO = Path(__file__).resolve().parents[2]


# ---- a CPU-only torch under cluster.device=gpu -------------------------------------------------------

def test_gpu_run_on_cpu_torch_is_one_clear_line_from_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "launcher", "train", "configs/tiny_cpu.yaml", "cluster.device=gpu",
                          f"logging.run_dir={tmp_path / 'run'}", "logging.wandb=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("medvlm-r1: driver: cluster.device=gpu, but torch ") and "CPU-only build" in last, last
    assert "pip install -e '.[gpu]'" in last and "Traceback" not in res.stderr


def test_check_command_names_what_a_gpu_run_lacks_here_in_one_line():
    """`medvlm-r1 check`, which slurm/train_8gpu.sh runs before it starts Ray."""
    run = lambda *args: subprocess.run([sys.executable, "-m", "launcher", "check", *args], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    gpu = run("configs/medvlm_r1_2b.yaml")
    assert gpu.returncode == 2 and len(gpu.stderr.strip().splitlines()) == 1, gpu.stderr[-2000:]
    assert gpu.stderr.startswith("medvlm-r1: this node: cluster.device=gpu, but torch ") and "CPU-only" in gpu.stderr
    assert "make setup-gpu" in gpu.stderr
    cpu = run("configs/tiny_cpu.yaml")
    assert (cpu.returncode, cpu.stdout.strip()) == (0, "medvlm-r1: check: configs/tiny_cpu.yaml loads; cpu profile")
    typo = run("configs/tiny_cpu.yaml", "learner.lrr=1")
    assert typo.returncode == 2 and "did you mean 'learner.lr'?" in typo.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_make_setup_gpu_without_a_gpu_stops_at_once_with_one_line(tmp_path):
    res = subprocess.run(["make", "-s", "setup-gpu", "GPU_VENV=" + str(tmp_path / "venv")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "make setup-gpu: no NVIDIA driver on this machine" in res.stderr
    assert not (tmp_path / "venv").exists() and res.stdout == ""


def test_actors_refuse_a_gpu_profile_on_cpu_torch(tiny_model_dir):
    from learner.actor import LearnerRank
    from rollout_workers.worker import RolloutWorker

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "cluster.device=gpu"])
    with pytest.raises(ProfileError, match=r"^learner rank 1: cluster.device=gpu, but torch .* CPU-only build"):
        LearnerRank(cfg, tiny_model_dir, 1, 2, "127.0.0.1", 1)
    with pytest.raises(ProfileError, match=r"^rollout worker 3: cluster.device=gpu, but torch .* CPU-only build"):
        RolloutWorker(cfg, tiny_model_dir, 3)
    check_torch_for("cpu", "driver", need_gpu=True)  # the CPU profile asks nothing of torch


# ---- a disabled NCCL communicator ---------------------------------------------------------------------

def _vllm_communicator_pair() -> list:
    """vLLM's PyNcclCommunicator for both ranks of a two-rank group, built the way its weight-sync
    engines build it (a StatelessProcessGroup over a TCPStore), here on CPU."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    from tests.cluster_utils import free_ports

    (port,) = free_ports(1)
    comms = [None, None]

    def build(rank):
        group = StatelessProcessGroup.create(host="127.0.0.1", port=port, rank=rank, world_size=2, store_timeout=60)
        comms[rank] = PyNcclCommunicator(group, device="cpu")

    threads = [threading.Thread(target=build, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(c is not None for c in comms), "the two ranks did not build their communicators"
    return comms


def test_a_communicator_without_libnccl_fails_at_init(monkeypatch):
    monkeypatch.delenv("VLLM_DISABLE_PYNCCL", raising=False)
    comms = _vllm_communicator_pair()
    assert all(c.disabled for c in comms)  # vLLM itself only marks it and carries on
    with pytest.raises(wu.WeightSyncError, match=r"^learner rank 0: the NCCL weight-sync communicator is disabled "
                                                 r"\(vLLM could not load libnccl"):
        wu.require_live_communicator(comms[0], "learner rank 0")


def test_a_communicator_disabled_by_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VLLM_DISABLE_PYNCCL", "1")
    comms = _vllm_communicator_pair()
    with pytest.raises(wu.WeightSyncError, match=r"VLLM_DISABLE_PYNCCL=1 is set; unset it"):
        wu.require_live_communicator(comms[1], "rollout worker 0")


@pytest.mark.parametrize("env, reason", [
    ({}, "NCCL only supports CUDA and ROCm"),  # the CPU torch: vLLM's loader refuses before looking
    ({"VLLM_DISABLE_PYNCCL": "true"}, "VLLM_DISABLE_PYNCCL=true is set"),
])
def test_rollout_worker_refuses_nccl_it_cannot_load(monkeypatch, env, reason):
    from rollout_workers.engine import check_nccl

    monkeypatch.delenv("VLLM_DISABLE_PYNCCL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(wu.WeightSyncError, match=r"^rollout worker 2: NCCL weight sync would be disabled") as err:
        check_nccl("rollout worker 2")
    assert reason in str(err.value)


# ---- sync backend rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, device, colocate, expected", [
    ("auto", "gpu", False, "nccl"), ("auto", "cpu", False, "gloo"),
    ("auto", "gpu", True, "ipc"), ("auto", "cpu", True, "gloo"), ("gloo", "gpu", True, "gloo"),
    ("nccl", "gpu", True, "Duplicate GPU|share a GPU"), ("ipc", "gpu", False, "needs cluster.colocate"),
    ("ipc", "cpu", True, "needs cluster.device=gpu"), ("nccl", "cpu", False, "needs cluster.device=gpu"),
])
def test_sync_backend_per_profile_and_placement(backend, device, colocate, expected):
    if expected in ("nccl", "gloo", "ipc"):
        assert wu.resolve_backend(backend, device, colocate) == expected
        return
    with pytest.raises(ValueError, match=expected):
        wu.resolve_backend(backend, device, colocate)
    with pytest.raises(ConfigError, match=r"^config key 'cluster.sync_backend': " + f"cluster.sync_backend={backend}"):
        load_config(None, [f"cluster.sync_backend={backend}", f"cluster.device={device}",
                           f"cluster.colocate={str(colocate).lower()}"])


@pytest.mark.parametrize("override, key", [
    ("rollout.num_workers=2", "rollout.num_workers"), ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size"),
])
def test_colocation_needs_one_engine_per_learner_rank_on_one_gpu(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}': with cluster.colocate"):
        load_config(None, ["cluster.colocate=true", "cluster.device=gpu", override])
    cfg = load_config("configs/medvlm_r1_2b.yaml", ["cluster.colocate=true", "rollout.num_workers=4"])
    assert cluster.actor_gpus(cfg, "learner") + cluster.actor_gpus(cfg, "worker") == 1  # the two share one GPU
    assert cluster.actor_gpus(load_config("configs/medvlm_r1_2b.yaml"), "learner") == 1


# ---- the two ports of a run ---------------------------------------------------------------------------

@pytest.mark.parametrize("master_port, drawn, expected", [
    (0, [40001, 40002], (40001, 40002)),  # both drawn, distinct by construction
    (40001, [40001, 40002], (40001, 40002)),  # the configured port was drawn too: the sync port skips it
    (40002, [40001, 40002], (40002, 40001)),
    (29500, [40001, 40002], (29500, 40001)),
])
def test_learner_and_sync_ports_never_collide(master_port, drawn, expected):
    cfg = load_config(None, [f"cluster.master_port={master_port}"])
    learner, sync = cluster.group_ports(cfg, drawn)
    assert (learner, sync) == expected and learner != sync
    with pytest.raises(ValueError, match="distinct"):
        cluster.group_ports(cfg, [40001, 40001])


def test_group_ports_are_drawn_free_and_below_the_ephemeral_range(monkeypatch):
    """Ports the kernel hands to outgoing connections are not drawn (one could be taken before rank 0 listens);
    without room below that range the kernel's own free ports are used."""
    import socket

    low = cluster.ephemeral_range()[0]
    ports = cluster.free_ports(8)
    assert len(set(ports)) == 8 and all(cluster.LOWEST_GROUP_PORT <= p < low for p in ports), (ports, low)
    for p in ports:
        with socket.socket() as s:
            s.bind(("", p))  # still free
    monkeypatch.setattr(cluster, "ephemeral_range", lambda: (cluster.LOWEST_GROUP_PORT + 10, 60999))
    assert len(set(cluster.free_ports(3))) == 3


# ---- defaults and warnings that only a GPU run meets --------------------------------------------------

@pytest.mark.parametrize("overrides,share", [([], 0.9), (["cluster.colocate=true"], 0.4),
                                             (["cluster.colocate=true", "rollout.gpu_memory_utilization=0.3"], 0.3)])
def test_engine_memory_share_follows_the_layout_unless_set(overrides, share):
    from rollout_workers.engine import gpu_memory_share

    cfg = load_config("configs/medvlm_r1_2b.yaml", ["learner.num_ranks=4", "rollout.num_workers=4", *overrides])
    assert cfg.rollout.gpu_memory_utilization == (share if overrides[1:] else None)
    assert gpu_memory_share(cfg) == share


def test_logprob_mismatch_is_reported_for_an_in_sync_batch_beyond_its_precision():
    from launcher.metrics import logprob_mismatch

    row = {"step": 7, "staleness/max": 0, "rollout_weight_version": 3, "logprob_diff/mean_abs": 0.06}
    warning = logprob_mismatch(row, "fp32")
    assert warning.startswith("step 7: the engine's log-probs differ from the learner's by 0.06 per token")
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in warning and "tied" in warning
    small = {**row, "logprob_diff/mean_abs": 0.005}
    assert logprob_mismatch(small, "bf16") is None and logprob_mismatch(small, "fp32") is not None
    # A batch sampled before the last update, or with the starting checkpoint, says nothing about the sync.
    assert logprob_mismatch({**row, "staleness/max": 1}, "fp32") is None
    assert logprob_mismatch({**row, "rollout_weight_version": 0}, "fp32") is None
    # learner.sync_every=2: step 7 follows step 6, which pushed; step 8 follows step 7, which did not (the
    # learner trains on weights one update ahead of the engine's).
    assert logprob_mismatch(row, "fp32", sync_every=2) is not None
    assert logprob_mismatch({**row, "step": 8}, "fp32", sync_every=2) is None
