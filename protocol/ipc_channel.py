"""The control channel of colocated weight sync (cluster.colocate=true, sync backend `ipc`).

The weights themselves travel by CUDA IPC through vLLM's own `ipc` weight-transfer engine: learner
rank i exports handles to a buffer on its GPU and the engine on the same GPU maps them. What still
has to cross between the two processes is small: the four calls of vLLM's weight-sync client
protocol (`init_weight_transfer_engine`, `start_weight_update`, `update_weights` with the handles,
`finish_weight_update`), in order, each answered before the next (the learner reuses its buffer for
the next chunk only once the engine has loaded the current one).

They go through a TCPStore hosted by learner rank 0, in one key space per pair (learner rank i and
rollout worker i), so that the driver still calls `push_weights` on the learners and
`receive_weights` on the workers at the same time, as it does for NCCL and gloo. The learner side is
a `ChannelClient` handed to vLLM's `IPCTrainerWeightTransferEngine`; the worker side `serve`s the
calls into its engine.
"""
from __future__ import annotations

import datetime
import pickle
from typing import Any, Callable, Optional

import torch

from protocol.weight_update import WeightSyncError

_PREFIX = "medvlm-ipc"


class PairChannel:
    """One learner rank and the rollout worker beside it, talking through rank 0's TCPStore."""

    def __init__(self, master_addr: str, master_port: int, pair: int, host: bool, timeout_s: float = 1800.0):
        try:
            self.store = torch.distributed.TCPStore(master_addr, int(master_port), None, is_master=host,
                                                    timeout=datetime.timedelta(seconds=timeout_s),
                                                    wait_for_workers=False)
        except (RuntimeError, OSError) as exc:
            raise WeightSyncError(f"weight sync pair {pair}: cannot reach the channel at {master_addr}:{master_port}: "
                                  f"{exc}") from exc
        self.pair, self._sent, self._served = pair, 0, 0

    def close(self) -> None:
        """Drop the store (rank 0's hosts the channel: the other ends lose it with it)."""
        self.store = None

    def _key(self, kind: str, n: int) -> str:
        return f"{_PREFIX}/{self.pair}/{kind}/{n}"

    def call(self, method: str, payload: Any = None) -> None:
        """Learner side: post one call and wait until the engine has run it; its failure is raised here."""
        n, self._sent = self._sent, self._sent + 1
        self.store.set(self._key("call", n), pickle.dumps((method, payload)))
        try:
            ok, error = pickle.loads(self.store.get(self._key("reply", n)))
        except RuntimeError as exc:  # the store's timeout, or rank 0's store gone
            raise WeightSyncError(f"weight sync pair {self.pair}: no answer from rollout worker {self.pair} to "
                                  f"{method}: {exc}") from exc
        self.store.delete_key(self._key("reply", n))
        if not ok:
            raise WeightSyncError(f"weight sync pair {self.pair}: rollout worker {self.pair} failed {method}: {error}")

    def serve(self, handle: Callable[[str, Any], None], until: str) -> list[str]:
        """Worker side: run the learner's calls in order with `handle(method, payload)`, answering each,
        until `until` has run; returns the methods run. A failed call is answered, then raised."""
        done = []
        while True:
            n, self._served = self._served, self._served + 1
            try:
                method, payload = pickle.loads(self.store.get(self._key("call", n)))
            except RuntimeError as exc:
                raise WeightSyncError(f"weight sync pair {self.pair}: no call from learner rank {self.pair} "
                                      f"(waiting for {until}): {exc}") from exc
            self.store.delete_key(self._key("call", n))
            error: Optional[str] = None
            try:
                handle(method, payload)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            self.store.set(self._key("reply", n), pickle.dumps((error is None, error)))
            if error is not None:
                raise WeightSyncError(f"weight sync pair {self.pair}: {method} failed: {error}")
            done.append(method)
            if method == until:
                return done


class ChannelClient:
    """vLLM's `VLLMWeightSyncClient` protocol over a `PairChannel` (learner side).

    `version` is set before each update and travels with `finish_weight_update`, so the worker can
    check that it loaded the update the driver asked for.
    """

    def __init__(self, channel: PairChannel):
        self.channel, self.version = channel, None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.channel.call("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self.channel.call("start_weight_update")

    def update_weights(self, update_info) -> None:
        self.channel.call("update_weights", update_info)

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        self.channel.call("finish_weight_update", weight_version if weight_version is not None else self.version)
