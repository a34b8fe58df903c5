"""The container recipe, read as text (no Docker engine here): what an operator relies on."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PINNED_PYTHON = re.compile(r"^python:3\.11\.\d+-slim-[a-z]+$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def args_of(dockerfile: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for word, rest in dockerfile if word == name]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
    return parsed


def test_multi_stage_on_a_pinned_python_base(dockerfile: list[tuple[str, str]]) -> None:
    stages = [shlex.split(rest) for rest in args_of(dockerfile, "FROM")]
    assert len(stages) >= 2, "build and runtime stages"
    for stage in stages:
        assert PINNED_PYTHON.match(stage[0]), f"{stage[0]} is not an exact python:3.11.x-slim"
    assert [word.lower() for word in stages[0][1:]] == ["as", "build"]
    copies = args_of(dockerfile, "COPY")
    assert any(c.startswith("--from=build ") for c in copies), "runtime copies the build's result"
    # The runtime stage carries no compiler or build tree.
    runtime = dockerfile[max(i for i, (w, _) in enumerate(dockerfile) if w == "FROM") :]
    assert not any("gcc" in rest or "build-essential" in rest for _, rest in runtime)


def test_runs_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    users = args_of(dockerfile, "USER")
    assert users, "a USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert any("useradd" in rest and user in rest for rest in args_of(dockerfile, "RUN"))
    # USER comes after every RUN: nothing runs as root once it is set.
    last_user = max(i for i, (w, _) in enumerate(dockerfile) if w == "USER")
    assert all(w != "RUN" for w, _ in dockerfile[last_user:])


def test_exposes_8080_and_listens_on_every_interface(dockerfile: list[tuple[str, str]]) -> None:
    assert "8080" in " ".join(args_of(dockerfile, "EXPOSE")).split()
    env = " ".join(args_of(dockerfile, "ENV"))
    assert "COSIGNER_LISTEN=0.0.0.0:8080" in env


def test_healthcheck_hits_healthz(dockerfile: list[tuple[str, str]]) -> None:
    (check,) = args_of(dockerfile, "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    for option in ("--interval=", "--timeout=", "--retries="):
        assert option in options
    argv = exec_form(command)
    assert "/healthz" in " ".join(argv)
    # The check runs the image's own Python: no curl or wget needs installing.
    assert argv[0] == "python"
    compile(argv[-1], "<healthcheck>", "exec")


def test_entrypoint_is_cosigner_serve(dockerfile: list[tuple[str, str]]) -> None:
    (entry,) = args_of(dockerfile, "ENTRYPOINT")
    (cmd,) = args_of(dockerfile, "CMD")
    assert exec_form(entry) + exec_form(cmd) == ["cosigner", "serve"]


def test_data_and_rules_are_volumes(dockerfile: list[tuple[str, str]]) -> None:
    volumes = [v for rest in args_of(dockerfile, "VOLUME") for v in exec_form(rest)]
    env = " ".join(args_of(dockerfile, "ENV"))
    assert "/data" in volumes
    assert "COSIGNER_DATABASE=sqlite:////data/cosigner.db" in env
    rules = re.search(r"COSIGNER_RULES=(\S+)", env)
    assert rules is not None and rules.group(1) in volumes
    # The shipped rules are the default content of the rules volume.
    assert any(c.split()[-1] == rules.group(1) for c in args_of(dockerfile, "COPY"))


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "*.db*", "cosigner-secret.key", ".git"):
        assert entry in ignored


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_wires_gateway_postgres_and_a_mail_catcher(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"gateway", "postgres", "mailpit"} <= set(services)
    for name in ("postgres", "mailpit"):
        image = services[name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")

    gateway = services["gateway"]
    assert gateway["build"] == "."
    env = gateway["environment"]
    assert env["COSIGNER_DATABASE"].startswith("postgresql://")
    assert "@postgres:5432/" in env["COSIGNER_DATABASE"]
    assert env["COSIGNER_SMTP_URL"] == "smtp://mailpit:1025"
    assert env["COSIGNER_PUBLIC_URL"].startswith("http://localhost:")
    assert len(env["COSIGNER_SECRET_KEY"]) >= 16 and env["COSIGNER_ADMIN_TOKEN"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "8080:8080" in gateway["ports"]
    assert any(v.endswith(":/app/rules:ro") for v in gateway["volumes"])
    assert any(v.split(":")[1] == "/data" for v in gateway["volumes"])


def test_compose_database_matches_the_postgres_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg = services["postgres"]["environment"]
    url = services["gateway"]["environment"]["COSIGNER_DATABASE"]
    expected = (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
        f"{pg['POSTGRES_DB']}"
    )
    assert url == expected
