"""The whole dev stack in one terminal: ``python -m workers.devstack`` (``make run``).

Starts the Temporal dev server, the platform sandbox, the worker and the API as
child processes (output prefixed per process), seeds a demo workspace with an
Instagram channel and the "Price list" automation (DESIGN.md §6), and prints how
to try it. Ctrl-C stops everything, newest process first. State lives in the
data dir (``.data``): SQLite, Temporal history, ``master.key`` and ``demo.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from core.db import DatabaseNotMigrated, head_revisions, migrate
from core.settings import DATA_DIR, DEV_APP_SECRET, Settings
from core.temporal import dev_server_args

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
TEMPORAL_PORT, TEMPORAL_UI_PORT, API_PORT, SANDBOX_PORT = 7233, 8233, 8000, 8100
API = f"http://{HOST}:{API_PORT}"
SANDBOX = f"http://{HOST}:{SANDBOX_PORT}"
DEMO_ACCOUNT = "17841400000000001"
DEMO_SENDER = "900001"
SEARCH_ATTRIBUTES = ("WorkspaceId", "ChannelId", "ContactId", "AutomationId", "Platform")
STOP_TIMEOUT = 10.0

DEMO_AUTOMATION = {
    "name": "Price list",
    "trigger": {"type": "dm_keyword", "keywords": ["price", "cost"], "match": "contains"},
    "steps": [
        {"id": "ask", "type": "send_message", "quick_replies": ["Not now"],
         "text": "Hi {{contact.first_name | there}}! Reply with your email for our price list."},
        {"id": "email", "type": "wait_for_reply", "timeout_seconds": 86400, "validate": "email",
         "save_to_field": "email", "retry_prompt": "That does not look like an email. Try again?",
         "on_timeout": "bye"},
        {"id": "tag", "type": "add_tag", "tag": "lead"},
        {"id": "thanks", "type": "send_message",
         "text": "Thanks! It is on its way to {{contact.fields.email}}.", "next": "end"},
        {"id": "bye", "type": "send_message", "text": "No worries, ask any time."},
    ],
}


class StartupError(Exception):
    pass


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stopping = threading.Event()
        self.out_lock = threading.Lock()
        self.muted: set[str] = set()

    def say(self, line: str) -> None:
        with self.out_lock:
            sys.stdout.write(f"[devstack] {line}\n")
            sys.stdout.flush()

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        # Own process group: Ctrl-C reaches only us, and we stop the children in order.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, proc))
        threading.Thread(target=self._pump, args=(name, proc), daemon=True).start()

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            # sandbox.simulate polls the call log every 50 ms: don't echo the polling.
            if name in self.muted or b"GET /_sandbox/calls" in raw:
                continue
            with self.out_lock:
                sys.stdout.write(f"[{name}] {raw.decode(errors='replace').rstrip()}\n")
                sys.stdout.flush()

    def check(self) -> None:
        """Raise when stopping was requested or a child died."""
        if self.stopping.is_set():
            raise KeyboardInterrupt
        for name, proc in self.children:
            if proc.poll() is not None:
                raise StartupError(f"{name} exited unexpectedly with code {proc.returncode}")

    def wait_until(self, what: str, ready, timeout: float = 60.0) -> None:
        poll_until(what, ready, self.check, StartupError, timeout, interval=0.25)

    def stop_all(self) -> None:
        self.stopping.set()
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                self.say(f"stopping {name}")
                if name == "temporal":
                    self.muted.add(name)  # its shutdown is a page of harmless poller warnings
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.say(f"{name} did not stop within {STOP_TIMEOUT:g} s; killing it")
                    proc.kill()
                    proc.wait()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def poll_until(what: str, ready, check, error: type[Exception], timeout: float, interval: float) -> None:
    """Try ``ready()`` until it is true (a refused connection or a failed
    command counts as not yet), ``check()`` first each time; ``error`` after
    ``timeout`` seconds. Shared with the bench's stack (bench/stack.py)."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        try:
            if ready():
                return
        except (OSError, httpx.HTTPError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            raise error(f"{what} was not ready within {timeout:g} s")
        time.sleep(interval)


def accepts(port: int) -> bool:
    """Something listens on the loopback port."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


def child_env(data: Path) -> dict[str, str]:
    defaults = {
        "VECTORY_ENVIRONMENT": "development",
        "VECTORY_DATABASE_URL": f"sqlite:///{data / 'vectory.db'}",
        "VECTORY_TEMPORAL_ADDRESS": f"{HOST}:{TEMPORAL_PORT}",
        "VECTORY_PUBLIC_URL": API,
        "VECTORY_GRAPH_API_URL": f"{SANDBOX}/graph",
        "VECTORY_INSTAGRAM_API_URL": f"{SANDBOX}/instagram",
        "VECTORY_TELEGRAM_API_URL": f"{SANDBOX}/telegram",
        "OPENAI_BASE_URL": f"{SANDBOX}/openai/v1",
        "OPENAI_API_KEY": "sandbox-key",
        "VECTORY_SANDBOX_URL": SANDBOX,
        "VECTORY_CODEC_TOKEN": codec_token(data),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def codec_token(data: Path) -> str:
    """A per-install token for the codec server the Temporal UI calls."""
    path = data / "codec.token"
    if not path.exists():
        data.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def seed_demo(stack: Stack, data: Path, admin_token: str) -> dict:
    """Create (or reuse, via demo.json) the demo workspace, channel and automation."""
    path = data / "demo.json"
    demo: dict = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:
        path.write_text(json.dumps(demo, indent=2) + "\n")

    with httpx.Client(base_url=API, timeout=60) as api, httpx.Client(base_url=SANDBOX, timeout=10) as sandbox:
        def key() -> dict[str, str]:
            return {"Authorization": f"Bearer {demo['api_key']}"}

        def register_account() -> None:
            r = sandbox.post("/_sandbox/accounts", json={"platform": "instagram", "account_id": DEMO_ACCOUNT,
                                                         "token": demo["token"], "username": "demo.shop"})
            r.raise_for_status()
            # The person the simulate command writes as: the profile lookup finds a name.
            r = sandbox.post("/_sandbox/profiles", json={"user_id": DEMO_SENDER, "name": "Sam Rivera",
                                                         "username": "sam.rivera"})
            r.raise_for_status()

        if not demo.get("api_key") or api.get("/v1/workspace", headers=key()).status_code != 200:
            r = api.post("/v1/workspaces", json={"name": "Demo shop", "business_use_attestation": True},
                         headers={"Authorization": f"Bearer {admin_token}"})
            if r.status_code != 201:
                raise StartupError(f"creating the demo workspace failed: {r.status_code} {r.text}")
            demo = {"workspace_id": r.json()["id"], "api_key": r.json()["api_key"]}
            save()
            stack.say(f"created workspace {demo['workspace_id']}")
        demo.setdefault("account_id", DEMO_ACCOUNT)
        demo.setdefault("token", f"IGAA{secrets.token_hex(24)}")
        register_account()  # the sandbox keeps accounts in memory: always re-register

        channel = api.get(f"/v1/channels/{demo['channel_id']}", headers=key()) if demo.get("channel_id") else None
        if channel is None or channel.status_code != 200 or channel.json()["status"] != "active":
            if channel is not None and channel.status_code == 200:
                api.delete(f"/v1/channels/{demo['channel_id']}", headers=key())
                demo["token"] = f"IGAA{secrets.token_hex(24)}"
                register_account()
            r = api.post("/v1/channels", json={"platform": "instagram", "access_token": demo["token"]}, headers=key())
            if r.status_code not in (201, 202):
                raise StartupError(f"connecting the demo Instagram account failed: {r.status_code} {r.text}"
                                   " (`make clean` starts over)")
            demo["channel_id"] = r.json()["id"]
            demo.pop("automation_id", None)
            save()
            stack.wait_until("the demo channel", lambda: api.get(
                f"/v1/channels/{demo['channel_id']}", headers=key()).json().get("status") == "active")
            stack.say(f"connected Instagram account {DEMO_ACCOUNT} as channel {demo['channel_id']}")

        if not demo.get("automation_id") or api.get(
                f"/v1/automations/{demo['automation_id']}", headers=key()).status_code != 200:
            r = api.post("/v1/automations", json={**DEMO_AUTOMATION, "channel_id": demo["channel_id"]}, headers=key())
            if r.status_code != 201:
                raise StartupError(f"creating the demo automation failed: {r.status_code} {r.text}")
            demo["automation_id"] = r.json()["id"]
            save()
            stack.say(f"created automation {demo['automation_id']} (\"Price list\")")
    return demo


def banner(demo: dict, app_secret: str, default_secret: str) -> str:
    py = os.path.relpath(sys.executable, ROOT) if Path(sys.executable).is_relative_to(ROOT) else sys.executable
    extra = f" --app-secret '{app_secret}'" if app_secret != default_secret else ""
    sim = f"{py} -m sandbox.simulate dm --account {DEMO_ACCOUNT} --sender {DEMO_SENDER}{extra}"
    rule = "=" * 78
    return "\n".join([
        rule,
        "  Vectory is running",
        f"  Temporal UI   http://{HOST}:{TEMPORAL_UI_PORT}",
        f"  API docs      {API}/docs",
        f"  Workspace     {demo['workspace_id']}",
        f"  API key       {demo['api_key']}",
        "",
        "  In another terminal, send an Instagram DM and see the automated reply:",
        f"    {sim} --text \"What's the price?\"",
        "  then answer with an email to finish the flow:",
        f"    {sim} --text \"me@example.com\"",
        "  and list the contacts it created:",
        f"    curl -s -H 'Authorization: Bearer {demo['api_key']}' {API}/v1/contacts",
        "",
        "  Ctrl-C stops everything.",
        rule,
    ])


def run(stack: Stack) -> None:
    busy = [p for p in (TEMPORAL_PORT, TEMPORAL_UI_PORT, API_PORT, SANDBOX_PORT) if not port_free(p)]
    if busy:
        ports = ", ".join(map(str, busy))
        raise StartupError(f"port{'s' if len(busy) > 1 else ''} {ports} on {HOST} already in use: stop what"
                           " listens there (another `make run`?) and try again")
    env = child_env(DATA_DIR)  # sets the defaults in os.environ before Settings reads them
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    settings.keyring()  # creates .data/master.key once, before the worker and the API race for it
    # The worker and the API refuse an unmigrated database: bring it to head first.
    try:
        migrate(settings.database_url)
    except DatabaseNotMigrated as exc:
        raise StartupError(str(exc)) from None
    stack.say(f"database migrated to {', '.join(head_revisions())}")

    temporal = str(BIN / "temporal")
    cmd = [temporal, "server", "start-dev", "--ip", HOST, "--port", str(TEMPORAL_PORT),
           "--ui-port", str(TEMPORAL_UI_PORT), "--log-level", "warn",
           *dev_server_args(db_file=str(DATA_DIR / "temporal.db")),
           # The UI decodes encrypted payloads through the API's codec server.
           "--ui-codec-endpoint", f"{API}/codec/t/{os.environ['VECTORY_CODEC_TOKEN']}"]
    for name in SEARCH_ATTRIBUTES:
        cmd += ["--search-attribute", f"{name}=Keyword"]
    stack.say("starting the Temporal dev server")
    stack.start("temporal", cmd, env)
    stack.wait_until("Temporal (port 7233)", lambda: accepts(TEMPORAL_PORT))
    address = f"{HOST}:{TEMPORAL_PORT}"
    stack.wait_until("the Temporal default namespace", lambda: subprocess.run(
        [temporal, "operator", "namespace", "describe", "default", "--address", address],
        capture_output=True, timeout=10).returncode == 0)

    py = sys.executable
    stack.start("sandbox", [py, "-m", "sandbox.app", "--host", HOST, "--port", str(SANDBOX_PORT)], env)
    stack.start("worker", [py, "-m", "workers.main"], env)
    stack.start("api", [str(BIN / "uvicorn"), "--factory", "workers.apiserver:create_app", "--host", HOST,
                        "--port", str(API_PORT)], env)
    stack.wait_until("the sandbox", lambda: http_ok(f"{SANDBOX}/_sandbox/health"))
    stack.wait_until("the API", lambda: http_ok(f"{API}/healthz"))
    demo = seed_demo(stack, DATA_DIR, settings.admin_token)
    with stack.out_lock:
        print(banner(demo, settings.meta_app_secret, DEV_APP_SECRET), flush=True)
    while True:
        stack.check()
        time.sleep(0.2)


def main() -> int:
    os.chdir(ROOT)
    stack = Stack()

    def on_signal(signum, frame) -> None:
        stack.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        run(stack)
    except KeyboardInterrupt:
        stack.say("shutting down")
    except (StartupError, httpx.HTTPError, ValueError) as exc:
        stack.say(f"error: {exc}")
        code = 1
    finally:
        stack.stop_all()
    stack.say("stopped" if code == 0 else "stopped after an error")
    return code


if __name__ == "__main__":
    sys.exit(main())
