"""Peak memory of this process and every process below it (a local Ray instance's actors and a vLLM
engine's processes among them), sampled by a background thread with psutil.

Per process: the peak resident set (RSS, every `interval_s`), the peak proportional set (PSS, which splits
shared pages such as the libraries among the processes that map them; every `slow_every` samples) and, per
title the process ran under (a Ray worker's title names its method: `ray::LearnerRank.train_on`), the
peak RSS seen meanwhile. For the whole tree: the peak of the RSS sum and of the PSS sum at one instant;
for the machine: the peak of `total - available`, which other programs move too. A peak shorter than one
interval can be missed.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Callable, Optional

import psutil

GIB = 1024**3
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


@dataclasses.dataclass
class ProcessPeak:
    pid: int
    ppid: int
    title: str  # the latest title seen
    rss: int = 0
    pss: int = 0
    rss_by_title: dict = dataclasses.field(default_factory=dict)  # title -> peak RSS while under it
    first_s: float = 0.0  # seconds after the sampler started when the process was first seen
    last_s: float = 0.0

    def title_at_peak(self) -> str:
        return max(self.rss_by_title, key=self.rss_by_title.get) if self.rss_by_title else self.title

    def ray_class(self) -> str:
        """`LearnerRank` for a Ray worker whose titles name that actor class, else ''."""
        names = {title_class(t) for t in self.rss_by_title} - {"", "IDLE"}
        return sorted(names)[0] if len(names) == 1 else ""


def process_title(proc: psutil.Process) -> str:
    """`ray::LearnerRank.train_on` for a Ray worker running a method, the command line otherwise."""
    text = " ".join(proc.cmdline()).strip()
    return text.split()[0].rstrip("()") if text.startswith(("ray::", "VLLM::")) else text[:160]


def title_class(title: str) -> str:
    """`LearnerRank` of `ray::LearnerRank.train_on`; '' for processes that are not Ray workers."""
    return title[len("ray::"):].split(".")[0] if title.startswith("ray::") else ""


class TreeMemorySampler:
    def __init__(self, root_pid: Optional[int] = None, interval_s: float = 0.2, slow_every: int = 10,
                 on_slow_tick: Optional[Callable[[], None]] = None):
        """`on_slow_tick` runs on the sampler's thread every `slow_every` samples (progress lines)."""
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval_s, self.slow_every, self.on_slow_tick = interval_s, slow_every, on_slow_tick
        self.peaks: dict[int, ProcessPeak] = {}
        self.total_rss = self.total_pss = 0
        self.machine_used_start = self.machine_used_peak = machine_used()
        self.samples = 0
        self.timeline: list[tuple[float, int, dict]] = []  # every slow sample: (seconds, machine used, {pid: RSS})
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> "TreeMemorySampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            slow = tick % self.slow_every == 0
            if slow:
                self._refresh_tree()
            self._sample(with_pss=slow)
            if slow and self.on_slow_tick is not None:
                try:
                    self.on_slow_tick()
                except Exception as exc:  # a progress line must never end the measurement
                    print(f"[real-shape] progress line failed: {exc!r}", flush=True)
            tick += 1
            self._stop.wait(self.interval_s)

    def _refresh_tree(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        now = time.monotonic() - self._t0
        for proc in procs:
            if proc.pid in self._procs:
                continue
            try:
                self.peaks.setdefault(proc.pid, ProcessPeak(proc.pid, proc.ppid(), process_title(proc), first_s=now))
            except _GONE:
                continue
            self._procs[proc.pid] = proc
        alive = {p.pid for p in procs}
        self._procs = {pid: p for pid, p in self._procs.items() if pid in alive}

    def _sample(self, with_pss: bool) -> None:
        now = time.monotonic() - self._t0
        total_rss = total_pss = 0
        rss_now = {}
        for pid, proc in list(self._procs.items()):
            try:
                rss = proc.memory_info().rss
                pss = proc.memory_full_info().pss if with_pss else 0
                title = process_title(proc)
            except _GONE:
                continue
            peak = self.peaks[pid]
            peak.rss, peak.pss, peak.last_s, peak.title = max(peak.rss, rss), max(peak.pss, pss), now, title
            peak.rss_by_title[title] = max(peak.rss_by_title.get(title, 0), rss)
            total_rss, total_pss, rss_now[pid] = total_rss + rss, total_pss + pss, rss
        used = machine_used()
        self.total_rss = max(self.total_rss, total_rss)
        if with_pss:
            self.total_pss = max(self.total_pss, total_pss)
            self.timeline.append((now, used, rss_now))
        self.machine_used_peak = max(self.machine_used_peak, used)
        self.samples += 1

    def below(self, pid: int) -> list[int]:
        """Every pid seen below `pid`, by the parentage recorded when each was first seen."""
        out, frontier = [], [pid]
        while frontier:
            kids = [p.pid for p in self.peaks.values() if p.ppid in frontier and p.pid not in out]
            out += kids
            frontier = kids
        return out


def machine_used() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available
