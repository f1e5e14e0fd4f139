"""Wiring of the container deployment: Dockerfile, docker-compose.yml, .env.example.

Docker cannot run in CI, so these tests read the files and check that they fit
the code: every setting production refuses at its default is a required compose
variable, the compose environment is a valid production configuration,
depends_on conditions have something to wait for, entry points exist, the
registered search attributes are the ones workflows use, and so on.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from temporalio.common import SearchAttributeIndexedValueType, SearchAttributeKey

import core.db
from api.routes import codec
from core.settings import SEARCH_ATTRIBUTES, Settings
from workflows import common

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"

APP_SERVICES = ("api", "worker", "migrate")  # built from this repository
FIRST_PARTY = {"api", "activities", "core", "sandbox", "workers", "workflows"}
# Not refused by Settings' production validator, but a deployment without them
# is broken: webhooks and OAuth need the public URL, the Web UI the codec token.
DEPLOYMENT_REQUIRED = {"VECTORY_PUBLIC_URL", "VECTORY_CODEC_TOKEN"}
PREFIX = Settings.model_config["env_prefix"]


# --- compose variable interpolation -----------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))"
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``, on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"] or "", m["arg"] or ""
        current = env.get(name)
        missing = current is None or (op.startswith(":") and current == "")
        if op.endswith("?") and missing:
            raise MissingVariable(f"{name}: {arg}")
        if op.endswith("-") and missing:
            return arg
        return current or ""

    return _VAR.sub(sub, value)


def references(value: Any) -> Iterator[tuple[str, str, str]]:
    """(name, operator, argument) of every variable a compose value references."""
    if isinstance(value, dict):
        for v in value.values():
            yield from references(v)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)
    elif isinstance(value, str):
        for m in _VAR.finditer(value):
            if not m["escaped"]:
                yield m["name"] or m["bare"], m["op"] or "", m["arg"] or ""


# --- fixtures and helpers -----------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def required_vars(compose: dict) -> set[str]:
    return {name for name, op, _ in references(compose) if op.endswith("?")}


@pytest.fixture(scope="module")
def secrets_env(required_vars: set[str]) -> dict[str, str]:
    """Values an operator would put in .env (for the required variables only)."""
    env = {name: f"test-{name.lower().replace('_', '-')}" for name in required_vars}
    env["VECTORY_MASTER_KEY"] = "k1:" + "A" * 43  # base64 of 32 bytes
    env["VECTORY_PUBLIC_URL"] = "https://vectory.example.com"
    return env


@pytest.fixture(scope="module")
def resolved(services: dict, secrets_env: dict[str, str]) -> dict:
    return interpolate(services, secrets_env)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith((PREFIX, "OPENAI_")):
            monkeypatch.delenv(key)
    return monkeypatch


def production_required() -> set[str]:
    """The variables Settings refuses to leave at their defaults in production."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(PREFIX):
                mp.delenv(key)
        try:
            Settings(environment="production")
        except ValidationError as exc:
            return set(re.findall(rf"{PREFIX}[A-Z_]+", str(exc)))
    pytest.fail("Settings accepts production with every secret at its default")


def env_var(field: str) -> str:
    return f"{PREFIX}{field.upper()}"


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def dockerfile_port() -> int:
    (expose,) = instructions(dockerfile_stages()[-1], "EXPOSE")
    return int(expose.split("/")[0])


# --- Dockerfile ---------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile must be multi-stage (builder + runtime)"
    final = stages[-1]
    users = instructions(final, "USER")
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert any(
        re.search(rf"useradd\b.*--uid 10001\b.*\b{re.escape(user)}\b", run)
        for run in instructions(final, "RUN")
    )
    assert any(c.startswith("--from=") and "/opt/venv" in c for c in instructions(final, "COPY"))
    env = " ".join(instructions(final, "ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env and "PYTHONUNBUFFERED=1" in env
    everything = DOCKERFILE.read_text()
    assert "[dev]" not in everything, "the image installs runtime dependencies only"


def test_dockerfile_copies_only_existing_runtime_sources_next_to_alembic_ini():
    stages = dockerfile_stages()
    final = stages[-1]
    (workdir,) = instructions(final, "WORKDIR")
    copied: dict[str, PurePosixPath] = {}
    for stage in stages:
        for args in instructions(stage, "COPY"):
            parts = args.split()
            if parts[0].startswith("--from="):
                continue
            *sources, dest = parts
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                if stage is final:
                    copied[source] = PurePosixPath(workdir) / dest
    packages = {s for s in copied if (ROOT / s / "__init__.py").exists()}
    assert {"api", "activities", "core", "workers", "workflows"} <= packages
    assert "sandbox" not in packages and "tests" not in copied

    # core/db.py finds alembic.ini in the parent of the core package, and
    # alembic.ini finds migrations/ next to itself.
    assert core.db.ALEMBIC_INI == ROOT / "alembic.ini"
    assert "script_location = %(here)s/migrations" in (ROOT / "alembic.ini").read_text()
    assert copied["alembic.ini"].parent == copied["core"].parent == copied["migrations"].parent
    # The sources are importable from any working directory.
    env = " ".join(instructions(final, "ENV"))
    assert f"PYTHONPATH={copied['core'].parent}" in env

    # Nothing the copied packages import is left out of the image.
    imported: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    assert (imported & FIRST_PARTY) <= packages


def test_dockerignore_keeps_secrets_out_and_copied_sources_in():
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    excluded = [p for p in patterns if not p.startswith("!")]
    for required in (".env", ".venv", ".git", ".data", "tests"):
        assert required in excluded, f".dockerignore must exclude {required}"

    def ignored(path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(prefix, p) for prefix in prefixes for p in excluded)

    for stage in dockerfile_stages():
        for args in instructions(stage, "COPY"):
            parts = args.split()
            if not parts[0].startswith("--from="):
                for source in parts[:-1]:
                    assert not ignored(source), f"COPY {source} is excluded by .dockerignore"


def test_dockerfile_command_and_healthcheck_use_the_exposed_port():
    final = dockerfile_stages()[-1]
    port = dockerfile_port()
    (cmd,) = instructions(final, "CMD")
    command = exec_form(cmd)
    assert command[:3] == ["uvicorn", "--factory", "workers.apiserver:create_app"]
    assert option(command, "--host") == "0.0.0.0"
    assert int(option(command, "--port")) == port
    (healthcheck,) = instructions(final, "HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in healthcheck and "urllib" in healthcheck


# --- compose: build, entry points, scaling ----------------------------------------


def test_app_services_build_this_repository(services: dict):
    assert DOCKERFILE.exists()
    for name in APP_SERVICES:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context")
        assert context == ".", f"{name} must build from the repository root"
        assert isinstance(build, str) or build.get("dockerfile", "Dockerfile") == "Dockerfile"


def test_commands_point_at_existing_entry_points(services: dict):
    commands = [exec_form(instructions(dockerfile_stages()[-1], "CMD")[0])]
    commands += [services[name]["command"] for name in APP_SERVICES]
    for command in commands:
        assert isinstance(command, list), f"use the exec form: {command!r}"
        if command[0] == "python":
            module = option(command, "-m")
            assert importlib.util.find_spec(module) is not None, f"no module {module}"
        elif command[0] == "uvicorn":
            assert "--factory" in command
            target = next(arg for arg in command[1:] if ":" in arg and not arg.startswith("-"))
            module, _, attr = target.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), target
        elif command[0] == "alembic":
            assert command[1:] == ["upgrade", "head"]
            assert (ROOT / "alembic.ini").exists() and (ROOT / "migrations" / "env.py").exists()
        else:
            pytest.fail(f"unexpected command {command}")
    assert services["worker"]["command"] == ["python", "-m", "workers.main"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]


def test_worker_is_scalable(services: dict):
    worker = services["worker"]
    assert "container_name" not in worker and "hostname" not in worker
    assert "ports" not in worker
    # The image's HEALTHCHECK probes the API's /healthz, which workers and the
    # migration job do not serve.
    for name in ("worker", "migrate"):
        assert services[name].get("healthcheck") == {"disable": True}, name


def test_api_port_matches_the_image(services: dict):
    port = dockerfile_port()
    api = services["api"]
    published = [str(p).rsplit(":", 1)[-1] for p in api["ports"]]
    assert published == [str(port)]
    assert int(option(api["command"], "--port")) == port
    assert option(api["command"], "--host") == "0.0.0.0"
    assert f"127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])


def test_depends_on_waits_for_healthy_or_completed_services(services: dict):
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use depends_on with conditions"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec.get("condition")
            target = services[dependency]
            if condition == "service_healthy":
                healthcheck = target.get("healthcheck") or {}
                assert healthcheck.get("test") and not healthcheck.get("disable"), (
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert target.get("restart") == "no", f'{dependency} is a one-shot job: restart: "no"'
            else:
                pytest.fail(f"{name} -> {dependency}: condition {condition!r}")
    expected = {
        "postgresql": "service_healthy",
        "temporal": "service_healthy",
        "temporal-setup": "service_completed_successfully",
        "migrate": "service_completed_successfully",
    }
    for name in ("api", "worker"):
        assert {k: v["condition"] for k, v in services[name]["depends_on"].items()} == expected, name
    assert services["migrate"]["depends_on"] == {"postgresql": {"condition": "service_healthy"}}


def test_third_party_images_are_pinned(services: dict):
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"{name}: pin {image} to a version tag"


# --- compose: environment -----------------------------------------------------------


def test_app_services_share_one_environment(services: dict):
    api_env = services["api"]["environment"]
    assert isinstance(api_env, dict)
    for name in APP_SERVICES:
        assert services[name]["environment"] == api_env, name


def test_production_secrets_are_required_variables(services: dict):
    needed = production_required()
    assert {
        "VECTORY_ADMIN_TOKEN",
        "VECTORY_META_APP_SECRET",
        "VECTORY_META_VERIFY_TOKEN",
        "VECTORY_MASTER_KEY",
    } <= needed
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["VECTORY_ENVIRONMENT"] == "production"
        for var in needed | DEPLOYMENT_REQUIRED:
            assert var in env, f"{name} lacks {var}"
            refs = list(references(env[var]))
            assert len(refs) == 1 and refs[0][:2] == (var, ":?"), (
                f"{name}: {var} must be `${{{var}:?...}}` so compose refuses to start without it"
            )
            with pytest.raises(MissingVariable):
                interpolate(env[var], {})


def test_every_setting_is_passed_and_defaults_match_settings(services: dict, clean_env: pytest.MonkeyPatch):
    env = services["api"]["environment"]
    fields = {env_var(field): field for field in Settings.model_fields}
    missing = set(fields) - set(env)
    assert not missing, f"settings not passed to the app services: {sorted(missing)}"
    unknown = {var for var in env if var.startswith(PREFIX)} - set(fields)
    assert not unknown, f"compose sets variables Settings does not read: {sorted(unknown)}"
    for value in env.values():
        for name, op, default in references(value):
            if op == ":-" and name in fields:
                field = fields[name]
                expected = Settings.model_fields[field].get_default(call_default_factory=True)
                assert getattr(Settings(**{field: default}), field) == expected, (
                    f"compose default of {name} ({default!r}) differs from Settings ({expected!r})"
                )
    # The openai client uses these verbatim: an empty base URL breaks it.
    assert interpolate(env["OPENAI_BASE_URL"], {}) == "https://api.openai.com/v1"
    assert interpolate(env["OPENAI_API_KEY"], {})


def test_compose_environment_is_a_valid_production_configuration(
    resolved: dict, clean_env: pytest.MonkeyPatch
):
    for key, value in resolved["api"]["environment"].items():
        clean_env.setenv(key, str(value))
    settings = Settings()
    assert settings.environment == "production"
    assert settings.keyring()[0][0] == "k1"
    assert settings.public_url == "https://vectory.example.com"
    assert settings.codec_token


def test_databases_are_wired_consistently(resolved: dict, secrets_env: dict[str, str]):
    url = make_url(resolved["api"]["environment"]["VECTORY_DATABASE_URL"])
    postgres = resolved["postgresql"]["environment"]
    temporal = resolved["temporal"]["environment"]
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgresql" and url.port == 5432
    assert url.username == postgres["POSTGRES_USER"] == temporal["POSTGRES_USER"]
    assert (
        url.password
        == postgres["POSTGRES_PASSWORD"]
        == temporal["POSTGRES_PWD"]
        == secrets_env["POSTGRES_PASSWORD"]
    )
    assert url.database == postgres["POSTGRES_DB"]
    assert temporal["DB"] == "postgres12"
    assert temporal["POSTGRES_SEEDS"] == "postgresql" and int(temporal["DB_PORT"]) == url.port
    assert "-h" in resolved["postgresql"]["healthcheck"]["test"], "pg_isready over TCP (not the init socket)"


def test_temporal_address_and_namespace_are_consistent(services: dict, secrets_env: dict[str, str]):
    for namespace in (None, "vectory-prod"):
        env = dict(secrets_env, **({"VECTORY_TEMPORAL_NAMESPACE": namespace} if namespace else {}))
        s = interpolate(services, env)
        app = s["api"]["environment"]
        assert app["VECTORY_TEMPORAL_ADDRESS"] == "temporal:7233"
        for name in ("temporal", "temporal-setup", "temporal-ui"):
            assert s[name]["environment"]["TEMPORAL_ADDRESS"] == app["VECTORY_TEMPORAL_ADDRESS"], name
        assert app["VECTORY_TEMPORAL_NAMESPACE"] == (namespace or "default")
        assert s["temporal"]["environment"]["DEFAULT_NAMESPACE"] == app["VECTORY_TEMPORAL_NAMESPACE"]
        assert s["temporal-setup"]["environment"]["NAMESPACE"] == app["VECTORY_TEMPORAL_NAMESPACE"]
    health = services["temporal"]["healthcheck"]["test"]
    assert health[1:5] == ["temporal", "operator", "cluster", "health"]


def test_ui_codec_endpoint_is_the_apis_token_in_path_codec(resolved: dict, secrets_env: dict[str, str]):
    ui = resolved["temporal-ui"]["environment"]
    base = f"{secrets_env['VECTORY_PUBLIC_URL']}/codec/t/{secrets_env['VECTORY_CODEC_TOKEN']}"
    assert ui["TEMPORAL_CODEC_ENDPOINT"] == base
    app = resolved["api"]["environment"]
    assert base.startswith(app["VECTORY_PUBLIC_URL"]) and app["VECTORY_CODEC_TOKEN"] in base
    # The UI posts to {endpoint}/decode and {endpoint}/encode.
    paths = {route.path for route in codec.router.routes}
    assert {"/codec/t/{token}/decode", "/codec/t/{token}/encode"} <= paths
    # Its browser origin may call the codec endpoint (CORS).
    (mapping,) = resolved["temporal-ui"]["ports"]
    host_port = str(mapping).split(":")[-2]
    origins = app["VECTORY_CODEC_CORS_ORIGINS"].split(",")
    assert f"http://localhost:{host_port}" in origins and f"http://127.0.0.1:{host_port}" in origins


# --- Temporal search attributes -----------------------------------------------------


def workflow_search_attributes() -> set[str]:
    keys = [v for v in vars(common).values() if isinstance(v, SearchAttributeKey)]
    assert all(k.indexed_value_type == SearchAttributeIndexedValueType.KEYWORD for k in keys)
    return {k.name for k in keys}


def test_setup_registers_the_search_attributes_workflows_use(services: dict):
    names = workflow_search_attributes()
    assert names == set(SEARCH_ATTRIBUTES)
    setup = services["temporal-setup"]
    assert setup["environment"]["SEARCH_ATTRIBUTES"].split() == list(SEARCH_ATTRIBUTES)
    assert setup["restart"] == "no"
    assert setup["depends_on"] == {"temporal": {"condition": "service_healthy"}}
    assert services["temporal"]["environment"]["SKIP_ADD_CUSTOM_SEARCH_ATTRIBUTES"] == "true"


FAKE_TEMPORAL = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *"search-attribute create"*"--name $FAKE_FAIL "*) echo "Error: $FAKE_ERROR" >&2; exit 1 ;;
esac
exit 0
"""


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
@pytest.mark.parametrize(
    ("error", "succeeds"),
    [("Search attribute ChannelId already exists.", True), ("permission denied", False)],
)
def test_setup_script_tolerates_already_registered_attributes(
    services: dict, secrets_env: dict[str, str], tmp_path: Path, error: str, succeeds: bool
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "temporal"
    fake.write_text(FAKE_TEMPORAL)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    setup = interpolate(services["temporal-setup"], secrets_env)
    env = {
        **os.environ,
        **setup["environment"],
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_FAIL": "ChannelId",
        "FAKE_ERROR": error,
    }
    argv = ["sh", *setup["entrypoint"][1:], *setup["command"]]
    assert setup["entrypoint"][0] == "/bin/sh"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode == 0) is succeeds, done.stdout + done.stderr
    creates = [line for line in log.read_text().splitlines() if "search-attribute create" in line]
    if succeeds:
        assert len(creates) == len(SEARCH_ATTRIBUTES)
        for name in SEARCH_ATTRIBUTES:
            assert any(
                f"--name {name} --type Keyword" in c and "--namespace default" in c for c in creates
            ), name
    else:
        assert "permission denied" in done.stderr


# --- .env.example -------------------------------------------------------------------


def env_example() -> dict[str, tuple[str, bool]]:
    """Variable -> (value, commented out) for every `VAR=` line of .env.example."""
    entries: dict[str, tuple[str, bool]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            entries[m[2]] = (m[3], bool(m[1]))
    return entries


def test_env_example_documents_every_compose_variable(compose: dict):
    documented = env_example()
    for name, op, arg in references(compose):
        assert name in documented, f".env.example does not document {name}"
        value, commented = documented[name]
        if op.endswith("?"):
            assert not commented and value == "", f"{name} is required: an empty, uncommented `{name}=` line"
        elif op.endswith("-"):
            assert value == arg, f".env.example shows {name}={value}, compose defaults to {arg}"


def test_env_example_generators_work(clean_env: pytest.MonkeyPatch):
    commands = re.findall(r'python -c "([^"]+)"', ENV_EXAMPLE.read_text())
    outputs = [
        subprocess.run(
            [sys.executable, "-c", c], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        for c in commands
    ]
    assert outputs and all(outputs)
    master_keys = [out for out in outputs if out.startswith("k1:")]
    assert len(master_keys) == 1
    assert Settings(master_key=master_keys[0]).keyring()[0][0] == "k1"


def test_temporal_service_gets_the_dev_servers_dynamic_config(resolved: dict):
    """The compose cluster runs with the settings `make run` and the
    benchmarks measure (eager start/activities, transfer-queue polling)."""
    from core.temporal import DEV_SERVER_DYNAMIC_CONFIG

    temporal = resolved["temporal"]
    target = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in temporal["volumes"]}
    assert target in mounts, "the dynamic config file is not mounted where DYNAMIC_CONFIG_FILE_PATH points"
    config = yaml.safe_load((ROOT / mounts[target]).read_text())
    flattened = {key: str(entries[0]["value"]).lower() for key, entries in config.items()}
    assert flattened == {key: value.lower() for key, value in DEV_SERVER_DYNAMIC_CONFIG.items()}


def test_the_configuration_page_documents_every_setting():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(env_var(field) for field in Settings.model_fields if f"`{env_var(field)}`" not in page)
    assert not missing, f"docs/configuration.md does not document {missing}"
