"""The benchmark's own stack: Temporal dev server, sandbox, worker and API as
subprocesses on free loopback ports, with a throwaway data dir.

Mirrors ``workers/devstack.py`` (search attributes, migrated database,
seeded workspace, channel and automations) but never touches the ports or
the ``.data`` dir of ``make run``. Output of every process goes to a log
file in the data dir; ``Stack.stop`` ends them newest first.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core.settings import SEARCH_ATTRIBUTES
from core.temporal import dev_server_args
from workers.devstack import accepts, poll_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
ACCOUNT_ID = "17841400000009999"
# What the worker, the API and the sandbox run: copied into the data dir at
# start, so edits made to the working tree during a run do not reach it.
CODE = ("api", "activities", "core", "sandbox", "workers", "workflows", "migrations", "alembic.ini", "bench")

PERSISTENCE = {
    # name -> extra dev-server flags (the db file goes in the data dir)
    "memory": [],
    "sqlite": ["--db-filename", "{data}/temporal.db"],
    "sqlite-wal": ["--db-filename", "{data}/temporal.db",
                   "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"],
}

KEYWORD = "bench"
WAIT_KEYWORD = "wait"
REPLY_AUTOMATION = {
    "name": "Bench reply",
    "trigger": {"type": "dm_keyword", "keywords": [KEYWORD], "match": "contains"},
    "steps": [{"id": "hi", "type": "send_message", "text": "Hi {{contact.first_name | there}}! Here is the price list."}],
}
WAIT_AUTOMATION = {
    "name": "Bench wait",
    "trigger": {"type": "dm_keyword", "keywords": [WAIT_KEYWORD], "match": "contains"},
    "steps": [
        {"id": "ask", "type": "send_message", "text": "Hi {{contact.first_name | there}}! What is your email?"},
        {"id": "email", "type": "wait_for_reply", "timeout_seconds": 86400, "validate": "email",
         "save_to_field": "email"},
        {"id": "thanks", "type": "send_message", "text": "Thanks! It is on its way to {{contact.fields.email}}."},
    ],
}


# ``--untuned``: the dev server's own default for the one setting
# core/temporal.py raises (each dispatch hop then waits up to 50 ms).
UNTUNED_DYNAMIC_CONFIG = ["history.transferProcessorMaxPollRPS=20"]


class StackError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(count: int, exclude: set[int] | None = None) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        port = free_port()
        if port not in (exclude or set()):
            ports.add(port)
    return list(ports)


@dataclass
class Seed:
    workspace_id: str = ""
    api_key: str = ""
    channel_id: str = ""
    account_id: str = ACCOUNT_ID
    token: str = ""
    reply_automation_id: str = ""
    wait_automation_id: str = ""


@dataclass
class Stack:
    data: Path
    persistence: str = "sqlite-wal"
    eager: bool = True
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    seed: Seed = field(default_factory=Seed)
    dev_server_flags: list[str] = field(default_factory=list)
    dynamic_config: list[str] = field(default_factory=list)  # extra KEY=VALUE for the dev server
    # Worker settings (VECTORY_WORKER_*, core/settings.py) for this run.
    worker_knobs: dict[str, str] = field(default_factory=dict)
    # Worker processes on the one task queue (the design allows any number:
    # idempotency records and rate budgets are in the database).
    workers: int = 1

    def __post_init__(self) -> None:
        self.src = ROOT
        self.temporal_port = free_port()
        self.temporal_address = f"{HOST}:{self.temporal_port}"
        self.pick_service_ports()
        self.database_url = f"sqlite:///{self.data / 'vectory.db'}"
        self.admin_token = secrets.token_urlsafe(16)
        master = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        self.master_key = f"bench1:{master}"

    def pick_service_ports(self) -> None:
        """Ports for the sandbox, the API and the worker's metrics. Picked
        again once the dev server runs: it binds ephemeral ports of its own
        (internal services), which once took the API's port."""
        (self.api_port, self.sandbox_port, self.worker_metrics_port,
         self.sdk_metrics_port) = free_ports(4, exclude={self.temporal_port})
        self.api_url = f"http://{HOST}:{self.api_port}"
        self.sandbox_url = f"http://{HOST}:{self.sandbox_port}"

    # -- processes -----------------------------------------------------------

    def snapshot(self) -> Path:
        src = self.data / "src"
        for name in CODE:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.md"))
            else:
                shutil.copy2(path, src / name)
        return src

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VECTORY_", "OPENAI_"))}
        return {
            **base,
            "PYTHONPATH": str(self.src),
            "PYTHONUNBUFFERED": "1",
            "VECTORY_ENVIRONMENT": "development",
            "VECTORY_DATA_DIR": str(self.data),
            "VECTORY_DATABASE_URL": self.database_url,
            "VECTORY_TEMPORAL_ADDRESS": self.temporal_address,
            "VECTORY_PUBLIC_URL": self.api_url,
            "VECTORY_ADMIN_TOKEN": self.admin_token,
            "VECTORY_MASTER_KEY": self.master_key,
            "VECTORY_GRAPH_API_URL": f"{self.sandbox_url}/graph",
            "VECTORY_INSTAGRAM_API_URL": f"{self.sandbox_url}/instagram",
            "VECTORY_TELEGRAM_API_URL": f"{self.sandbox_url}/telegram",
            "VECTORY_SANDBOX_URL": self.sandbox_url,
            "OPENAI_BASE_URL": f"{self.sandbox_url}/openai/v1",
            "OPENAI_API_KEY": "sandbox-key",
            "VECTORY_CODEC_TOKEN": secrets.token_urlsafe(16),
            "VECTORY_WORKER_METRICS_PORT": str(self.worker_metrics_port),
            "VECTORY_SDK_METRICS_PORT": str(self.sdk_metrics_port),
            # The automated-DM budget per account (200/hour by default) would throttle every
            # figure after the first 200 replies: off, as core/settings.py says for benchmarks.
            "VECTORY_AUTOMATED_DM_PER_HOUR": "0",
            **self.worker_knobs,
        }

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.data / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(cmd, cwd=self.src, env={**self.env(), **(env or {})}, stdin=subprocess.DEVNULL,
                                    stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs[name] = proc
        self.order.append(name)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def worker_pids(self) -> list[int]:
        return [proc.pid for name, proc in self.procs.items() if name.startswith("worker")]

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.data / f"{name}.log").read_text(errors="replace")[-2000:]
                raise StackError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def wait_until(self, what: str, ready, timeout: float = 60.0) -> None:
        poll_until(what, ready, self.check, StackError, timeout, interval=0.2)

    def start(self, log=print) -> None:
        self.src = self.snapshot()
        py = sys.executable
        # Import check and migration in the snapshot, before anything starts.
        done = subprocess.run(
            [py, "-c", "import sys, workers.apiserver; from core.db import migrate; migrate(sys.argv[1])",
             self.database_url], cwd=self.src, env=self.env(), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StackError(f"the code snapshot does not import or migrate:\n{done.stderr[-2000:]}")
        temporal = str(BIN / "temporal")
        # The dev server as make run starts it (core/temporal.py), with this
        # run's persistence and dynamic-config overrides.
        overrides = dict(item.split("=", 1) for item in self.dynamic_config)
        if not self.eager:
            overrides |= {"system.enableEagerWorkflowStart": "false", "system.enableActivityEagerExecution": "false"}
        flags = ["--log-level", "error", "--headless", *dev_server_args(overrides)]
        flags += [arg.format(data=self.data) for arg in PERSISTENCE[self.persistence]]
        for name in SEARCH_ATTRIBUTES:
            flags += ["--search-attribute", f"{name}=Keyword"]
        self.dev_server_flags = flags
        log(f"starting the Temporal dev server on {self.temporal_address} ({self.persistence})")
        self._start("temporal", [temporal, "server", "start-dev", "--ip", HOST, "--port", str(self.temporal_port),
                                 *flags])
        self.wait_until("Temporal", lambda: accepts(self.temporal_port))
        self.wait_until("the Temporal default namespace", lambda: subprocess.run(
            [temporal, "operator", "namespace", "describe", "default", "--address", self.temporal_address],
            capture_output=True, timeout=10).returncode == 0)
        self.pick_service_ports()
        self._start("sandbox", [py, "-m", "sandbox.app", "--host", HOST, "--port", str(self.sandbox_port),
                                "--log-level", "warning"])
        self._start("worker", [py, "-m", "workers.main"])
        for n in range(2, self.workers + 1):  # metrics endpoints on the first one only
            self._start(f"worker{n}", [py, "-m", "workers.main"],
                        env={"VECTORY_WORKER_METRICS_PORT": "0", "VECTORY_SDK_METRICS_PORT": "0"})
        self._start("api", self.api_cmd())
        self.wait_until("the sandbox", lambda: httpx.get(f"{self.sandbox_url}/_sandbox/health", timeout=2)
                        .status_code == 200)
        self.wait_until("the API", lambda: httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200)
        log(f"stack up: API {self.api_url}, sandbox {self.sandbox_url}, data {self.data}")

    def api_cmd(self) -> list[str]:
        return [str(BIN / "uvicorn"), "--factory", "workers.apiserver:create_app", "--host", HOST,
                "--port", str(self.api_port), "--log-level", "warning", "--no-access-log"]

    def restart_api(self) -> None:
        """Replace a wedged API process (its log goes on in api.log)."""
        proc = self.procs["api"]
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.order.remove("api")
        log = open(self.data / "api.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.procs["api"] = subprocess.Popen(self.api_cmd(), cwd=self.src, env=self.env(),
                                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
        finally:
            log.close()
        self.order.append("api")
        self.wait_until("the API", lambda: httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200)

    def stop(self, log=print) -> None:
        for name in reversed(self.order):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log(f"{name} did not stop within {STOP_TIMEOUT:g} s; killing it")
                    proc.kill()
                    proc.wait()
        self.order.clear()

    # -- seed ----------------------------------------------------------------

    def seed_data(self, log=print) -> Seed:
        seed = self.seed
        seed.token = f"IGAA{secrets.token_hex(24)}"
        with httpx.Client(base_url=self.api_url, timeout=60) as api, \
                httpx.Client(base_url=self.sandbox_url, timeout=10) as sandbox:
            r = api.post("/v1/workspaces", json={"name": "Bench shop", "business_use_attestation": True},
                         headers={"Authorization": f"Bearer {self.admin_token}"})
            if r.status_code != 201:
                raise StackError(f"creating the workspace failed: {r.status_code} {r.text}")
            seed.workspace_id, seed.api_key = r.json()["id"], r.json()["api_key"]
            key = {"Authorization": f"Bearer {seed.api_key}"}
            r = sandbox.post("/_sandbox/accounts", json={"platform": "instagram", "account_id": seed.account_id,
                                                         "token": seed.token, "username": "bench.shop"})
            r.raise_for_status()
            r = api.post("/v1/channels", json={"platform": "instagram", "access_token": seed.token}, headers=key)
            if r.status_code not in (201, 202):
                raise StackError(f"connecting the Instagram account failed: {r.status_code} {r.text}")
            seed.channel_id = r.json()["id"]
            self.wait_until("the channel", lambda: api.get(f"/v1/channels/{seed.channel_id}", headers=key)
                            .json().get("status") == "active")
            for spec, attr in ((REPLY_AUTOMATION, "reply_automation_id"), (WAIT_AUTOMATION, "wait_automation_id")):
                r = api.post("/v1/automations", json={**spec, "channel_id": seed.channel_id}, headers=key)
                if r.status_code != 201:
                    raise StackError(f"creating automation {spec['name']!r} failed: {r.status_code} {r.text}")
                setattr(seed, attr, r.json()["id"])
        log(f"seeded workspace {seed.workspace_id}, channel {seed.channel_id}, 2 automations")
        return seed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out
