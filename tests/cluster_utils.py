"""A real one-node Slurm cluster (munged, slurmctld, slurmd) and Ray-port helpers for the cluster tests.

Everything lives in a temporary folder and on loopback ports; `SlurmCluster.stop` kills the daemons
it started and nothing else.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two GRPO steps of the tiny model (configs/tiny_cpu.yaml), nothing else: no format warm-up, no evaluation, no W&B.
SHORT_RUN = [
    "train.steps=2", "train.format_warmup_steps=0", "train.eval_at_end=false", "train.eval_every=0",
    "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=16",
    "learner.micro_batch_size=4", "logging.wandb=false", "logging.progress_bar=false", "logging.sample_every=0",
]
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports that were free a moment ago (bound together so none repeats)."""
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def ray_port_args() -> tuple[int, int, list[str]]:
    """(gcs port, dashboard port, `ray start` flags): every listening port of a Ray node pinned to a free
    one, so that this Ray instance never collides with another on the same machine."""
    gcs, dash, client, agent, agent_grpc, env_agent, nm, om, metrics, wmin = free_ports(10)
    flags = [
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
    ]
    return gcs, dash, flags


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
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """munged + slurmctld + slurmd for this host, configured under `root`."""

    root: Path
    cpus: int = 2
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        ctld_port, d_port = free_ports(2)
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            host=self.host, root=self.root, ctld_port=ctld_port, d_port=d_port, cpus=self.cpus))
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "-f", f"--socket={m}/munge.socket", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i"])
        self._wait(lambda: self.scontrol("ping").returncode == 0, timeout, "slurmctld ping")
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host])
        self._wait(self._node_ready, timeout, "node idle in sinfo")

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

    def _node_ready(self) -> bool:
        res = self.run(["sinfo", "-h", "-o", "%t"])
        return res.returncode == 0 and res.stdout.strip() in ("idle", "mix", "alloc")

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
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        return [n for n, p in self.procs.items() if p.poll() is None]
