"""A real one-node Slurm cluster (munged, slurmctld, slurmd) and Ray-port helpers for the cluster tests.

Everything lives in a temporary folder and on loopback ports; `SlurmCluster.stop` kills the daemons
it started and nothing else.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two GRPO steps of the tiny model (configs/tiny_cpu.yaml), nothing else: no format warm-up, no evaluation, no W&B.
SHORT_RUN = [
    "train.steps=2", "train.format_warmup_steps=0", "train.eval_at_end=false", "train.eval_every=0",
    "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=16",
    "learner.micro_batch_size=4", "logging.wandb=false", "logging.progress_bar=false", "logging.sample_every=0",
]


@contextlib.contextmanager
def own_session(cmd: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """`cmd` started from the repository root in a session of its own (its own process group, as a command
    in a terminal); whatever happens in the block, the group is SIGKILLed on leaving it if still running."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports that were free a moment ago, drawn as the launcher draws its groups' ports (below the
    ephemeral range, where no outgoing connection takes one meanwhile)."""
    from launcher.cluster import free_ports as draw

    return draw(count)


def _node_port_flags(ports: list[int]) -> list[str]:
    agent, agent_grpc, env_agent, nm, om, metrics = ports
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--metrics-export-port={metrics}"]


def ray_port_args() -> tuple[int, int, list[str], list[str]]:
    """(gcs port, dashboard port, head `ray start` flags, worker `ray start` flags): every listening port of
    a Ray node pinned to a free one, so that this Ray instance collides neither with another Ray instance on
    the machine nor, when emulated Slurm nodes share this host, its head with its worker."""
    ports = free_ports(15)
    gcs, dash, client = ports[:3]
    head = [f"--ray-client-server-port={client}"] + _node_port_flags(ports[3:9])
    return gcs, dash, head, _node_port_flags(ports[9:15])


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            status = (entry / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
        if text in cmd and status != "Z":
            found.append((int(entry.name), cmd.strip()))
    return found


def slurm_missing() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


def ensure_slurm_installed() -> Optional[str]:
    """Install Debian's slurm-wlm and munge when missing. Returns None when ready, else why not."""
    if not slurm_missing():
        return None
    if os.geteuid() != 0:
        return f"Slurm binaries missing ({', '.join(slurm_missing())}) and not root, so apt-get cannot install them"
    if shutil.which("apt-get") is None:
        return "Slurm binaries missing and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            return f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}"
    missing = slurm_missing()
    return f"still missing after apt-get: {', '.join(missing)}" if missing else None


SLURM_CONF = """\
ClusterName=medvlm
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MinJobAge=3600
KillWait=30
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN"


@dataclass
class SlurmCluster:
    """munged + slurmctld + one slurmd per node, configured under `root`. Every node is this host: with
    nodes > 1, several slurmd daemons (one per node name, each on its own port) emulate a larger cluster;
    `cpus` is declared per node (config_overrides lets it exceed the real cores)."""

    root: Path
    nodes: int = 1
    cpus: int = 2
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict = field(default_factory=dict)

    @property
    def node_names(self) -> list[str]:
        return [self.host] if self.nodes == 1 else [f"node{i + 1}" for i in range(self.nodes)]

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        ctld_port, d_port, *node_ports = free_ports(2 + self.nodes)
        nodes = "\n".join(NODE_LINE.format(name=n, host=self.host, port=p, cpus=self.cpus)
                          for n, p in zip(self.node_names, node_ports))
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            root=self.root, host=self.host, ctld_port=ctld_port, d_port=d_port, nodes=nodes,
            node_names=",".join(self.node_names)))
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "-f", f"--socket={m}/munge.socket", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i"])
        self._wait(lambda: self.scontrol("ping").returncode == 0, timeout, "slurmctld ping")
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name])
        self._wait(self._nodes_ready, timeout, f"{self.nodes} node(s) idle in sinfo")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.daemon_logs())
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.daemon_logs())

    def _nodes_ready(self) -> bool:
        res = self.run(["sinfo", "-h", "-N", "-o", "%t"])
        states = res.stdout.split()
        return res.returncode == 0 and len(states) == self.nodes and all(s == "idle" for s in states)

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args])

    def daemon_logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                out.append(f"--- {f.name} ---\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def job_state(self, job_id: str) -> dict:
        """The job's fields from `scontrol show job` (kept in memory for MinJobAge after it ends)."""
        res = self.scontrol("show", "job", "-o", job_id)
        if res.returncode != 0:
            return {}
        fields = {}
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: str, timeout: float) -> dict:
        """Poll until the job leaves PENDING/RUNNING/COMPLETING; returns its final fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state and state.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
                return state
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still not finished after {timeout:.0f}s: {self.job_state(job_id)}")

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Kill every daemon started here (slurmd first, munged last); returns those still alive."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("slurmd"), n == "munged"))
        for name in order:
            p = self.procs[name]
            if p.poll() is not None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        return [n for n, p in self.procs.items() if p.poll() is None]


@contextlib.contextmanager
def started_controller(cfg, model_dir: str):
    """(training records, controller) of `cfg` in a Ray session of their own, as `medvlm-r1 train` starts
    its actors; they are stopped and Ray shut down on leaving."""
    import ray

    from launcher import cluster
    from launcher.controller import Controller
    from launcher.data import build_datasets

    cluster.start_ray(cfg)
    try:
        records, _ = build_datasets(cfg.data)
        actors = Controller.start(cfg, model_dir)
        try:
            yield records, actors
        finally:
            actors.stop()
    finally:
        ray.shutdown()


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid` now (a driver's Ray processes, actors and engines)."""
    return psutil.Process(pid).children(recursive=True)


def ray_session_dir(procs: list[psutil.Process]) -> str:
    """The Ray session folder named on the raylet's command line: every process of that Ray instance
    mentions it or is a descendant of the driver."""
    for p in procs:
        match = re.search(r"--session[_-]dir=(\S+)", " ".join(p.cmdline()))
        if match:
            return match.group(1)
    raise AssertionError(f"no raylet among the driver's processes: {[p.name() for p in procs]}")


def left_over(procs: list[psutil.Process], session_dir: str, timeout: float = 30) -> list[str]:
    """Those of `procs` and of the Ray instance's processes still alive after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [f"{p.pid} {name}" for p in procs if (name := _live_name(p))]
        alive += [f"{pid} {cmd[:120]}" for pid, cmd in processes_mentioning(session_dir)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def _live_name(p: psutil.Process) -> str:
    """The process's name while it runs (not a zombie); "" once it is gone, even mid-check."""
    try:
        return p.name() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE else ""
    except psutil.NoSuchProcess:
        return ""
