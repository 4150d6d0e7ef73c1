"""What the learner (sender) and the rollout engines (receivers) agree on for a weight update.

Both ends import this module and nothing of each other. It holds the description of an update
(parameter names, dtypes, shapes in Hugging Face checkpoint naming), the bucket plan that both
sides derive from that description, the per-bucket header that lets a receiver prove it is
reading the bucket it expects, and the gloo process-group set-up. It imports torch only:
no vLLM, no DeepSpeed, so the learner can load it without an inference stack.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import zlib
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

# Buckets of this many bytes trade per-message latency (many small tensors) against memory for
# the flat send/receive buffers; 64 MiB keeps both small for models up to a few billion weights.
DEFAULT_BUCKET_BYTES = 64 << 20

# Header layout (int64): magic, version, bucket index, tensor count, total elements, dtype code,
# fingerprint of the bucket's names and shapes. The tensor count is -1 at the end of an update and
# -2 when the sender gave up (it found a bad tensor), so that receivers fail instead of waiting.
_MAGIC = 0x4D5652  # "MVR"
HEADER_LEN = 7
END_OF_UPDATE = -1
ABORTED = -2

# Wire dtypes by name; a code is the index, so both ends must share this tuple (they do: it is here).
DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


class WeightSyncError(RuntimeError):
    """A weight update that cannot proceed; the message names the parameter, bucket or version."""


# cluster.sync_backend: `auto` is NCCL on GPU and gloo on CPU; with cluster.colocate it is vLLM's CUDA-IPC
# engine on GPU (a learner rank and its engine share one GPU, where NCCL refuses two ranks of one
# communicator: "Duplicate GPU detected") and gloo on CPU.
SYNC_BACKENDS = ("auto", "nccl", "gloo", "ipc")


def resolve_backend(sync_backend: str, device: str, colocate: bool = False) -> str:
    """The transport for weight sync; a combination that cannot work is a ValueError saying why."""
    if sync_backend not in SYNC_BACKENDS:
        raise ValueError(f"cluster.sync_backend must be one of {', '.join(SYNC_BACKENDS)}, got {sync_backend!r}")
    if sync_backend == "auto":
        return ("ipc" if colocate else "nccl") if device == "gpu" else "gloo"
    if sync_backend in ("nccl", "ipc") and device != "gpu":
        raise ValueError(f"cluster.sync_backend={sync_backend} needs cluster.device=gpu; use gloo on the CPU profile")
    if sync_backend == "nccl" and colocate:
        raise ValueError("cluster.sync_backend=nccl cannot run with cluster.colocate=true: a learner rank and its "
                         "engine share a GPU, and NCCL refuses two ranks of one group on one GPU; use ipc (or auto)")
    if sync_backend == "ipc" and not colocate:
        raise ValueError("cluster.sync_backend=ipc needs cluster.colocate=true: CUDA IPC maps the learner's memory "
                         "into the engine on the same GPU")
    return sync_backend


def require_live_communicator(comm, who: str) -> None:
    """Fail when vLLM built its NCCL communicator disabled.

    vLLM's PyNcclCommunicator marks itself disabled (instead of failing) when VLLM_DISABLE_PYNCCL is
    set or libnccl cannot be loaded; every broadcast on it is then skipped on both ends, and the
    engines would load whatever their receive buffers held as weights.
    """
    if not getattr(comm, "disabled", True) and getattr(comm, "available", False):
        return
    raise WeightSyncError(f"{who}: the NCCL weight-sync communicator is disabled ({nccl_disabled_reason()}); "
                          "its broadcasts would be skipped and the engines would load garbage as weights")


def nccl_disabled_reason() -> str:
    """Why vLLM would build its NCCL communicator disabled, as far as the environment tells."""
    flag = os.environ.get("VLLM_DISABLE_PYNCCL", "")
    if flag.strip().lower() in ("1", "true"):
        return f"VLLM_DISABLE_PYNCCL={flag} is set; unset it"
    return ("vLLM could not load libnccl (install the gpu extra, whose torch brings nvidia-nccl-cu13, "
            "or point VLLM_NCCL_SO_PATH at libnccl.so.2)")


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise WeightSyncError(f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class WeightUpdateMeta:
    """Names (Hugging Face checkpoint names), dtypes and full shapes of every tensor of an update, in order.

    Fixed for a model: the learner builds it once and the driver hands it to every receiver.
    """

    names: tuple[str, ...]
    dtype_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        n = len(self.names)
        if len(self.dtype_names) != n or len(self.shapes) != n:
            raise ValueError(f"WeightUpdateMeta: {n} names but {len(self.dtype_names)} dtypes "
                             f"and {len(self.shapes)} shapes")
        if len(set(self.names)) != n:
            dup = next(x for x in self.names if self.names.count(x) > 1)
            raise ValueError(f"WeightUpdateMeta: parameter {dup!r} appears twice")
        for name, dt in zip(self.names, self.dtype_names):
            if dt not in DTYPES:
                raise ValueError(f"WeightUpdateMeta: parameter {name!r} has unsupported dtype {dt!r}")

    @staticmethod
    def from_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> "WeightUpdateMeta":
        names, dtypes, shapes = [], [], []
        for name, t in named:
            names.append(name)
            dtypes.append(dtype_name(t.dtype))
            shapes.append(tuple(int(s) for s in t.shape))
        return WeightUpdateMeta(tuple(names), tuple(dtypes), tuple(shapes))

    @staticmethod
    def from_dict(d: dict) -> "WeightUpdateMeta":
        try:
            return WeightUpdateMeta(tuple(d["names"]), tuple(d["dtype_names"]),
                                    tuple(tuple(int(s) for s in sh) for sh in d["shapes"]))
        except KeyError as exc:
            raise ValueError(f"weight update description lacks key {exc}") from None

    def to_dict(self) -> dict:
        """Plain lists, the form vLLM's `update_weights` RPC carries to its workers."""
        return {"names": list(self.names), "dtype_names": list(self.dtype_names),
                "shapes": [list(s) for s in self.shapes]}

    def numel(self, i: int) -> int:
        n = 1
        for s in self.shapes[i]:
            n *= s
        return n

    def nbytes(self, i: int) -> int:
        return self.numel(i) * torch.empty((), dtype=getattr(torch, self.dtype_names[i])).element_size()

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(i) for i in range(len(self.names)))


def bucket_plan(meta: WeightUpdateMeta, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[range]:
    """Contiguous runs of tensors that travel as one flat message.

    A bucket holds one dtype and at most `bucket_bytes`, except that a tensor larger than the cap
    travels alone. It depends only on `meta`, so sender and receivers cut the stream alike.
    """
    plan, start, size = [], 0, 0
    for i in range(len(meta.names)):
        b = meta.nbytes(i)
        same_dtype = meta.dtype_names[i] == meta.dtype_names[start]
        if i > start and (not same_dtype or size + b > bucket_bytes):
            plan.append(range(start, i))
            start, size = i, 0
        size += b
    if len(meta.names) > start:
        plan.append(range(start, len(meta.names)))
    return plan


def _fingerprint(meta: WeightUpdateMeta, idx: range) -> int:
    text = ";".join(f"{meta.names[i]}:{meta.dtype_names[i]}:{list(meta.shapes[i])}" for i in idx)
    return zlib.crc32(text.encode())


def bucket_header(meta: WeightUpdateMeta, idx: range, bucket: int, version: int) -> torch.Tensor:
    """The small message sent ahead of bucket `bucket`; equal on both ends when they agree."""
    numel = sum(meta.numel(i) for i in idx)
    code = DTYPES.index(meta.dtype_names[idx.start])
    return torch.tensor([_MAGIC, version, bucket, len(idx), numel, code, _fingerprint(meta, idx)],
                        dtype=torch.int64)


def end_header(version: int, buckets: int) -> torch.Tensor:
    return torch.tensor([_MAGIC, version, buckets, END_OF_UPDATE, 0, 0, 0], dtype=torch.int64)


def abort_header(version: int, bucket: int) -> torch.Tensor:
    return torch.tensor([_MAGIC, version, bucket, ABORTED, 0, 0, 0], dtype=torch.int64)


def check_header(got: torch.Tensor, want: torch.Tensor, meta: WeightUpdateMeta, idx: range | None) -> None:
    """Raise naming the first parameter of the bucket when the sender's header differs from ours."""
    g, w = got.tolist(), want.tolist()
    if g == w:
        return
    where = f"bucket {w[2]} starting at parameter {meta.names[idx.start]!r}" if idx is not None else "end of update"
    if g[0] != _MAGIC:
        raise WeightSyncError(f"weight update: malformed header at {where}: {g}")
    if g[3] == ABORTED:
        raise WeightSyncError(f"weight update v{g[1]}: the sender aborted before bucket {g[2]} "
                              "(its error names the tensor)")
    if g[1] != w[1]:
        raise WeightSyncError(f"weight update: sender sent version {g[1]}, receiver expected version {w[1]} ({where})")
    if g[3] == END_OF_UPDATE:
        raise WeightSyncError(f"weight update v{w[1]}: sender ended after {g[2]} buckets; receiver expected {where}")
    raise WeightSyncError(
        f"weight update v{w[1]}: sender's bucket {g[2]} ({g[3]} tensors, {g[4]} elements, {DTYPES[g[5]]}) "
        f"does not match the receiver's {where} ({w[3]} tensors, {w[4]} elements, {DTYPES[w[5]]}); "
        "sender and receiver describe the model differently")


def unpack(flat: torch.Tensor, meta: WeightUpdateMeta, idx: range) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat`, one per parameter of the bucket, with their checkpoint names."""
    out, offset = [], 0
    for i in idx:
        n = meta.numel(i)
        out.append((meta.names[i], flat[offset:offset + n].view(meta.shapes[i])))
        offset += n
    return out


def fill_bucket(pairs: Iterator[tuple[str, torch.Tensor]], meta: WeightUpdateMeta, idx: range) -> torch.Tensor:
    """The next tensors of the stream copied into one flat CPU buffer, each as soon as it arrives.

    Copying at once matters: a ZeRO-3 gather yields a tensor that is released when the next
    parameter is asked for.
    """
    flat = torch.empty(sum(meta.numel(i) for i in idx), dtype=getattr(torch, meta.dtype_names[idx.start]))
    offset = 0
    for i in idx:
        _, tensor = next(pairs)
        n = meta.numel(i)
        flat[offset:offset + n].copy_(tensor.detach().reshape(-1))
        offset += n
    return flat


def checked(pairs: Iterable[tuple[str, torch.Tensor]], meta: WeightUpdateMeta) -> Iterator[tuple[str, torch.Tensor]]:
    """The pairs, each checked against what the receivers were told to expect.

    A ZeRO-3 parameter that was not gathered arrives as an empty tensor; the receivers size their
    buffers from `meta`, so the broadcast would hang or load garbage: fail here instead.
    """
    i = 0
    for name, tensor in pairs:
        if i >= len(meta.names):
            raise WeightSyncError(f"weight sync: parameter {name!r} is beyond the {len(meta.names)} declared")
        want = (meta.names[i], meta.dtype_names[i], meta.shapes[i])
        got = (name, dtype_name(tensor.dtype), tuple(tensor.shape))
        if got != want:
            raise WeightSyncError(f"weight sync: tensor {i} is {got[0]!r} {got[1]} {list(got[2])}, "
                                  f"but receivers expect {want[0]!r} {want[1]} {list(want[2])}")
        i += 1
        yield name, tensor
    if i != len(meta.names):
        raise WeightSyncError(f"weight sync: only {i} of {len(meta.names)} declared tensors were given; "
                              f"first missing is {meta.names[i]!r}")


def send_update(group: "GlooGroup", named: Iterable[tuple[str, torch.Tensor]], meta: WeightUpdateMeta,
                version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Rank 0's side of one update: per bucket a header then the flat tensor data, then an end header."""
    pairs = checked(named, meta)
    plan = bucket_plan(meta, bucket_bytes)
    for b, idx in enumerate(plan):
        # A bucket is filled (and checked) whole before its header goes out, so a bad tensor can
        # still be announced to the receivers instead of leaving them waiting.
        with _abort_on_error(group, version, b):
            flat = fill_bucket(pairs, meta, idx)
        group.broadcast(bucket_header(meta, idx, b, version))
        group.broadcast(flat)
    with _abort_on_error(group, version, len(plan)):
        for _ in pairs:  # runs the count check at the end of `checked`
            pass
    group.broadcast(end_header(version, len(plan)))


@contextlib.contextmanager
def _abort_on_error(group: "GlooGroup", version: int, bucket: int):
    try:
        yield
    except BaseException:
        group.broadcast(abort_header(version, bucket))
        raise


def receive_update(group: "GlooGroup", meta: WeightUpdateMeta, version: int,
                   load: Callable[[list[tuple[str, torch.Tensor]]], object],
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: Union[str, torch.device] = "cpu") -> None:
    """A receiver's side of one update: `load` gets each bucket's (name, tensor) pairs as it lands."""
    plan = bucket_plan(meta, bucket_bytes)
    for b, idx in enumerate(plan):
        _expect(group, bucket_header(meta, idx, b, version), meta, idx)
        flat = torch.empty(sum(meta.numel(i) for i in idx), dtype=getattr(torch, meta.dtype_names[idx.start]),
                           device=device)
        group.broadcast(flat)
        load(unpack(flat, meta, idx))
    _expect(group, end_header(version, len(plan)), meta, None)


def _expect(group: "GlooGroup", want: torch.Tensor, meta: WeightUpdateMeta, idx: Optional[range]) -> None:
    got = torch.empty_like(want)
    group.broadcast(got)
    check_header(got, want, meta, idx)


class GlooGroup:
    """A gloo group of its own, rendezvoused through a TCPStore that rank 0 hosts.

    It is not the default process group, so it coexists with DeepSpeed's group in the learner and
    with vLLM's own groups in the engine's worker processes.
    """

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float = 1800.0):
        if not 0 <= rank < world_size:
            raise WeightSyncError(f"weight sync rank {rank} is outside the group of {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            # Rank 0 hosts the store; it must outlive the group, so the object keeps it.
            self.store = torch.distributed.TCPStore(master_addr, int(master_port), world_size, is_master=(rank == 0),
                                                    timeout=timeout, wait_for_workers=False)
            prefixed = torch.distributed.PrefixStore("medvlm-weight-sync", self.store)
            self.group = torch.distributed.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        except (RuntimeError, OSError) as exc:
            raise WeightSyncError(f"weight sync rank {rank} of {world_size}: cannot join the group at "
                                  f"{master_addr}:{master_port}: {exc}") from exc
        self.rank, self.world_size = rank, world_size

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Blocking broadcast from rank 0 (in place on the other ranks)."""
        self.group.broadcast(tensor, 0).wait()

    def close(self) -> None:
        self.group = None
        self.store = None
