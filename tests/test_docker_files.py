"""The Docker files say what they mean, checked without a Docker engine: the compose file's services, AOF,
volumes, health checks and start order; a multi-stage Dockerfile running as a non-root user with a health
check on a real probe; every command is a real `stockhold` command and every variable one the code reads.
(`make docker-lint` adds hadolint and Docker Compose's own validation.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.api.routes.ops import router as ops_router
from app.config import Settings
from app.store.postgres import MIGRATIONS_DIR
from app.store.scripts import LUA_DIR

ROOT = Path(__file__).resolve().parents[1]
STOCKHOLD = Path(sys.executable).with_name("stockhold")
SETTINGS_VARS = {str(f.validation_alias) for f in Settings.model_fields.values()}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def _dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments) with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"unreadable FROM: {rest}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _json_array(instruction_args: str) -> list[str]:
    value = yaml.safe_load(instruction_args)  # a JSON array is YAML too
    assert isinstance(value, list), f"not exec form: {instruction_args}"
    return [str(v) for v in value]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, Any]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _entrypoint() -> list[str]:
    (entrypoint,) = _dockerfile_stages()[-1].args("ENTRYPOINT")
    return _json_array(entrypoint)


def _runs_as_help(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`stockhold <argv> --help`: exit 0 only when every word names a real command and every option
    given exists (an unknown one is a usage error, exit 2, even beside --help)."""
    return subprocess.run([str(STOCKHOLD), *argv, "--help"], capture_output=True, text=True, timeout=60)


# ---- docker-compose.yml -------------------------------------------------------------------------------


def test_compose_names_the_four_services() -> None:
    assert {"api", "worker", "redis", "postgres"} <= set(_services())


def test_redis_keeps_an_aof_fsynced_every_second_on_a_volume() -> None:
    redis = _services()["redis"]
    command = redis["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    settings = dict(zip(words[1::2], words[2::2], strict=False))
    assert settings.get("--appendonly") == "yes"
    assert settings.get("--appendfsync") == "everysec"
    # evicting a counter under memory pressure would sell stock from nothing
    assert settings.get("--maxmemory-policy") == "noeviction"
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])


def test_postgres_keeps_its_data_on_a_volume_where_the_image_expects_it() -> None:
    postgres = _services()["postgres"]
    tag = re.search(r":(\d+)", postgres["image"])
    assert tag, "the PostgreSQL image names its major version"
    major = int(tag.group(1))
    # From 18 on, the official image refuses a volume on the old .../data path.
    expected = "/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data"
    targets = [str(v).split(":")[1] for v in postgres["volumes"]]
    assert expected in targets
    named = set(_compose()["volumes"])
    assert {str(v).split(":")[0] for v in postgres["volumes"]} <= named


def test_stores_have_health_checks_and_the_service_starts_after_them() -> None:
    services = _services()
    for store in ("redis", "postgres"):
        assert services[store]["healthcheck"]["test"], store
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        for store in ("redis", "postgres"):
            assert depends[store]["condition"] == "service_healthy", (name, store)


def test_api_relies_on_the_image_health_check_and_the_worker_turns_it_off() -> None:
    services = _services()
    # The image's HEALTHCHECK probes HTTP; the worker serves none, so it would be unhealthy forever.
    assert "healthcheck" not in services["api"] or not services["api"]["healthcheck"].get("disable")
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_api_runs_without_an_in_process_worker_and_with_keys_required() -> None:
    api_env = _services()["api"]["environment"]
    assert api_env["STOCKHOLD_WORKER_IN_PROCESS"] == "false"
    assert api_env.get("STOCKHOLD_REQUIRE_AUTH", "true") == "true"
    assert "STOCKHOLD_EMBEDDED" not in api_env


def test_api_and_worker_agree_on_the_servers_and_the_shards() -> None:
    services = _services()
    for var in ("REDIS_URL", "DATABASE_URL", "STOCKHOLD_SHARDS"):
        assert services["api"]["environment"][var] == services["worker"]["environment"][var], var
    assert services["api"]["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "@postgres:" in services["api"]["environment"]["DATABASE_URL"]


def test_both_stockhold_services_build_and_run_the_one_image() -> None:
    services = _services()
    assert services["api"]["image"] == services["worker"]["image"]
    assert services["api"]["build"] == services["worker"]["build"] == "."


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_sets_only_variables_the_code_reads(service: str) -> None:
    assert set(_services()[service]["environment"]) <= SETTINGS_VARS


@pytest.mark.parametrize(("service", "subcommand"), [("api", "serve"), ("worker", "worker")])
def test_compose_commands_are_real_stockhold_commands(service: str, subcommand: str) -> None:
    argv = [*_entrypoint(), *_services()[service]["command"]]
    assert argv[0] == "stockhold"
    assert argv[1] == subcommand
    out = _runs_as_help(argv[1:])
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_container_commands_are_real_stockhold_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running in containers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = []
    for line in "".join(blocks).splitlines():
        line = line.split("  #", 1)[0]
        found = re.search(r"docker compose run (?:--rm |-T )*api ([^)`]*)", line) or re.search(
            r"docker compose exec api stockhold ([^)`]*)", line
        )
        if found:
            commands.append(shlex.split(found.group(1)))
    assert len(commands) >= 3, section
    for argv in commands:
        out = _runs_as_help(argv)
        assert out.returncode == 0, (argv, out.stdout + out.stderr)


# ---- Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_copies_from_a_named_stage() -> None:
    stages = _dockerfile_stages()
    names = {s.name for s in stages if s.name}
    assert len(stages) >= 2
    assert len(names) == len(stages), "every stage is named (FROM ... AS name)"
    copied_from = {m.group(1) for rest in stages[-1].args("COPY") for m in re.finditer(r"--from=(\S+)", rest)}
    assert copied_from and copied_from <= names


def test_runtime_stage_runs_as_a_non_root_user() -> None:
    users = _dockerfile_stages()[-1].args("USER")
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_health_check_probes_a_real_endpoint_with_what_the_image_has() -> None:
    (check,) = _dockerfile_stages()[-1].args("HEALTHCHECK")
    options, _, cmd = check.partition("CMD ")
    assert cmd and all(o.startswith("--") for o in options.split()), f"HEALTHCHECK [--options] CMD [...]: {check}"
    command = _json_array(cmd)
    assert command[0] == "python", "the image has Python; curl is not installed"
    (url,) = re.findall(r"http://127\.0\.0\.1:[^/]*(/\w+)", command[2])
    assert url in {getattr(route, "path", None) for route in ops_router.routes}


def test_base_image_python_satisfies_requires_python() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)", text, re.MULTILINE)
    assert base, "the base image is python:X.Y-..."
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = re.fullmatch(r">=(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert needed
    assert (int(base.group(1)), int(base.group(2))) >= (int(needed.group(1)), int(needed.group(2)))
    assert all(s.base == "${PYTHON_IMAGE}" for s in _dockerfile_stages())


def test_image_runs_stockhold_serve_by_default() -> None:
    (cmd,) = _dockerfile_stages()[-1].args("CMD")
    assert _entrypoint() == ["stockhold"]
    assert _json_array(cmd) == ["serve"]


def test_image_listens_beyond_loopback_and_sets_only_variables_the_code_reads() -> None:
    env: dict[str, str] = {}
    for rest in _dockerfile_stages()[-1].args("ENV"):
        env.update(tuple(word.split("=", 1)) for word in shlex.split(rest))
    assert env["STOCKHOLD_HOST"] == "0.0.0.0"
    ours = {k for k in env if k.startswith("STOCKHOLD_") or k.endswith("_URL")}
    assert ours <= SETTINGS_VARS


def test_build_copies_what_the_code_reads_and_dockerignore_lets_it_through() -> None:
    (build,) = [s for s in _dockerfile_stages() if any("pip install" in r for r in s.args("RUN"))][-1:]
    sources = {rest.split()[0] for rest in build.args("COPY") if not rest.startswith("--")}
    # app/store finds Lua and SQL beside app/, in the source tree the image installs editable
    assert {"app", LUA_DIR.relative_to(ROOT).as_posix(), MIGRATIONS_DIR.relative_to(ROOT).as_posix()} <= sources
    assert "pyproject.toml" in sources and "README.md" in sources  # pyproject names the readme
    for source in sources:
        assert (ROOT / source).exists(), source
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allowlist: everything else stays out of the build context"
    assert sources <= {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
