"""The deployment files, checked with the real programs (no Docker engine here): the
compose file as ``docker-compose config`` resolves it, and what it promises a plant's
security review (no published port, read-only configuration, state on named volumes,
health checks that mean something), the health check itself against a running service."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.brokers import started_mosquitto
from fixtures.need import missing
from fixtures.output import Lines
from fixtures.ports import free_port
from uns.testing import running

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
HEALTHCHECK = ROOT / "deploy/healthcheck.py"
PUBLISH = ROOT / "deploy/compose.publish.yml"


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        missing(f"{program} is not installed", ci=".ci/run must install it")
    return path


def compose_config(
    *files: Path, profile: str | None = None, env: dict[str, str] | None = None
) -> str:
    args = [need("docker-compose")]
    for f in files or (ROOT / "docker-compose.yml",):
        args += ["-f", str(f)]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run(
        [*args, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@cache
def resolved(profile: str | None = "demo") -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors merged, paths absolute)."""
    config: dict[str, Any] = yaml.safe_load(compose_config(profile=profile))
    return config


def uns_services() -> dict[str, dict[str, Any]]:
    """The containers running a service of ours (`uns run SERVICE`)."""
    return {
        name: spec
        for name, spec in resolved()["services"].items()
        if (spec.get("command") or [])[:1] == ["run"]
    }


def test_the_compose_file_is_valid():
    compose_config()
    compose_config(profile="demo")
    compose_config(ROOT / "docker-compose.yml", PUBLISH)


def test_every_compose_service_runs_a_service_that_exists():
    from uns.plugins import service_classes

    for name, spec in uns_services().items():
        assert spec["command"][1] in service_classes(), name


def test_the_demo_profile_holds_the_simulated_plant_and_cloud_not_the_pipeline():
    services = resolved()["services"]
    demo = {name for name, spec in services.items() if "demo" in spec.get("profiles", [])}
    assert demo == {"simulator", "demo", "cloud"}
    started = set(services) - demo
    assert {"mosquitto", "opcua-adapter", "modbus-adapter", "featurizer", "inference"} <= started
    assert {"bridge", "prometheus", "grafana"} <= started
    for name in started:  # a dependency on what is not started would stop `up`
        assert not set(services[name].get("depends_on", {})) & demo, name


def test_no_port_is_published_unless_the_operator_opts_in():
    published = {n: s["ports"] for n, s in resolved()["services"].items() if s.get("ports")}
    assert not published, f"docker-compose.yml publishes {published}"
    opted = yaml.safe_load(compose_config(ROOT / "docker-compose.yml", PUBLISH))["services"]
    ports = {n: s["ports"] for n, s in opted.items() if s.get("ports")}
    assert set(ports) == {"mosquitto", "grafana", "prometheus"}
    for name, entries in ports.items():
        for entry in entries:
            spec = entry if isinstance(entry, str) else f"{entry['host_ip']}:{entry['published']}"
            assert spec.startswith("127.0.0.1:"), f"{name} published beyond the box: {entry}"
    there = compose_config(
        ROOT / "docker-compose.yml", PUBLISH, env={"UNS_PUBLISH_ADDR": "10.20.0.5"}
    )
    assert "10.20.0.5:3000:3000" in there


def test_every_container_restarts_and_every_service_is_checked_by_its_own_metrics():
    for name, spec in resolved()["services"].items():
        assert spec.get("restart") == "unless-stopped", name
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, spec in uns_services().items():
        command = spec["command"]
        port = command[command.index("--metrics-port") + 1]
        assert spec["healthcheck"]["test"] == [
            "CMD",
            "python",
            "/opt/uns/deploy/healthcheck.py",
            port,
        ], name
        host = f"UNS_SERVICES__{command[1].upper().replace('-', '_')}__METRICS_HOST"
        assert spec["environment"].get(host) == "0.0.0.0", f"{name}: Prometheus cannot scrape it"
        assert spec.get("cap_drop") == ["ALL"], name


BROKER_SECRETS = ROOT / "deploy/secrets/broker"
"""Where README "Security" has `uns broker secure --compose --out` write the broker's files."""


@cache
def generated(tmp: str) -> Path:
    """What `uns broker secure` writes for the example plant, in a scratch directory: the
    layout the compose file mounts from deploy/secrets/broker."""
    out = Path(tmp) / "broker"
    result = subprocess.run(
        [sys.executable, "-m", "uns", "broker", "secure", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


def host_file(source: str, tmp: Path) -> Path:
    """The file a mount or secret names, where a clean clone has it: generated broker
    files are looked for in what `uns broker secure` writes."""
    path = Path(source)
    if path.is_relative_to(BROKER_SECRETS):
        return generated(str(tmp)) / path.relative_to(BROKER_SECRETS)
    return path


def test_configuration_is_mounted_read_only_and_state_lives_on_named_volumes(tmp_path):
    named = set(resolved()["volumes"])
    for name, spec in resolved()["services"].items():
        for mount in spec.get("volumes", []):
            source, _target, *mode = mount.split(":")
            if source.startswith("/"):  # a file or directory of the host: configuration
                assert mode == ["ro"], f"{name} mounts {source} writable"
                there = host_file(source, tmp_path)
                assert there.exists(), f"{name} mounts {source}, which nothing makes"
                assert there.name != "ca.key", f"{name} is given the CA's private key"
            else:
                assert source in named, f"{name}: {source} is not a named volume"
    inference, bridge = uns_services()["inference"], uns_services()["bridge"]
    env = {**inference["environment"], **bridge["environment"]}

    def volume_at(container: dict[str, Any], path: str) -> str:
        for mount in container["volumes"]:
            source, target, *_ = mount.split(":")
            if source in named and (path + "/").startswith(target.rstrip("/") + "/"):
                return source
        raise AssertionError(f"{path} is on no named volume")

    assert volume_at(bridge, env["UNS_SERVICES__BRIDGE__JOURNAL__PATH"]) == "bridge-journal"
    assert volume_at(inference, env["UNS_SERVICES__INFERENCE__AUDIT_LOG"]) == "inference-audit"
    assert volume_at(inference, env["UNS_SERVICES__INFERENCE__MODELS_DIR"]) == "models"


def test_each_container_environment_is_a_configuration_its_service_accepts():
    """plant.yaml overlaid with each container's variables, as the service reads it when it
    starts, for the default run and for the demo cloud: no field refused; the broker, the
    PLCs and the cloud it is given are compose services; its files are where it mounts them."""
    from uns import config
    from uns.plugins import services

    demo_cloud = {
        "UNS_SERVICES__BRIDGE__REMOTE__URL": "mqtt://cloud:1883",
        "UNS_SERVICES__BRIDGE__REMOTE__ALLOW_PLAINTEXT": "true",
    }
    names = set(resolved()["services"])
    for env in ({}, demo_cloud):
        containers = yaml.safe_load(compose_config(profile="demo", env=env))["services"]
        for name, spec in containers.items():
            command = spec.get("command") or []
            if command[:1] != ["run"]:
                continue
            environ = {k: str(v) for k, v in spec["environment"].items() if v is not None}
            mounts = {m.split(":")[1]: m.split(":")[0] for m in spec.get("volumes", [])}
            loaded = config.load(mounts[environ["UNS_CONFIG"]], environ=environ)
            settings: Any = loaded.service(command[1], services()[command[1]].load_settings())
            assert config.parse_broker_url(environ["UNS_BROKER_URL"]).host in names
            if name == "opcua-adapter":
                assert settings.url.split("//")[1].split(":")[0] in names
            if name == "modbus-adapter":
                assert settings.host in names
            if name == "inference":
                assert mounts[settings.pubkey] == str(ROOT / "keys/models.pub")
            if name == "bridge" and env:
                assert settings.remote.url == "mqtt://cloud:1883"
                assert "cloud" in names
            elif name == "bridge":
                assert settings.remote is None  # idles until plant.yaml names the cloud


def test_every_service_logs_in_as_itself_with_its_own_generated_password(tmp_path):
    """No anonymous client on the compose Mosquitto: each uns container has its node's user
    name and a password file, which is the one `uns broker secure` wrote for that node,
    and no container is handed another's."""
    from uns import config
    from uns.secure import node_id

    secrets = resolved()["secrets"]
    loaded = config.load(ROOT / "uns-schema/plant.yaml")
    given: dict[str, str] = {}
    for name, spec in uns_services().items():
        env = spec["environment"]
        user = env.get("UNS_BROKER__USERNAME")
        assert user == node_id(loaded, spec["command"][1]), f"{name} logs in as {user}"
        assert config.parse_broker_url(env["UNS_BROKER_URL"]).password is None, name
        mounted = {s["target"]: s["source"] for s in spec.get("secrets", [])}
        target = Path(env["UNS_BROKER__PASSWORD_FILE"])
        assert target.parent == Path("/run/secrets"), name
        source = Path(secrets[mounted[target.name]]["file"])
        assert source == BROKER_SECRETS / "secrets" / f"{user}.password", name
        assert host_file(str(source), tmp_path).exists(), f"nothing writes {source}"
        assert str(source) not in given.values(), f"{name} shares {source}"
        given[name] = str(source)


def test_prometheus_and_grafana_are_given_their_provisioning():
    services = resolved()["services"]
    mounts = {m.split(":")[1]: Path(m.split(":")[0]) for m in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus"] == ROOT / "deploy/prometheus"
    grafana = {m.split(":")[1]: Path(m.split(":")[0]) for m in services["grafana"]["volumes"]}
    provider = yaml.safe_load(
        (grafana["/etc/grafana/provisioning"] / "dashboards/uns.yml").read_text()
    )["providers"][0]
    dashboards = grafana[provider["options"]["path"]]
    assert list(dashboards.glob("*.json")), "the provisioned dashboard directory is empty"
    source = yaml.safe_load(
        (grafana["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in services["grafana"]["environment"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith(
        "/run/secrets/"
    )


def test_the_image_runs_uns_as_a_user_and_carries_the_health_check():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "FROM python:3.11-slim" in lines
    assert 'ENTRYPOINT ["uns"]' in lines  # exec form: signals reach uns, not a shell
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(
        line.startswith("COPY deploy/healthcheck.py /opt/uns/deploy/healthcheck.py")
        or line == "COPY deploy/healthcheck.py deploy/healthcheck.py"
        for line in lines
    )
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!keys/models.pub" in ignored and "!keys/\n" not in ignored  # no signing key


def test_the_build_context_holds_what_the_image_copies_and_no_secret():
    """The files `docker build` would send, by .dockerignore as Docker reads it (docker-py's
    own matcher, which docker-compose builds with)."""
    need("docker-compose")
    probe = (
        "import json, sys; from docker.utils.build import exclude_paths;"
        "lines = open('.dockerignore').read().splitlines();"
        "pats = [p.strip() for p in lines if p.strip() and not p.startswith('#')];"
        "print(json.dumps(sorted(exclude_paths('.', pats, dockerfile='Dockerfile'))))"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if result.returncode and "No module named 'docker'" in result.stderr:
        missing("docker-py is not installed", ci="docker-compose brings python3-docker")
    assert result.returncode == 0, result.stderr
    sent = set(json.loads(result.stdout))
    copied = [
        line.split()[-2]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    for source in copied:
        assert any(f == source.rstrip("/") or f.startswith(source) for f in sent), source
    for package in list(ROOT.glob("libs/*/pyproject.toml")) + list(
        ROOT.glob("services/*/pyproject.toml")
    ):
        assert str(package.relative_to(ROOT)) in sent
    leaked = [
        f
        for f in sent
        if f.startswith((".venv/", ".git/", "var/", "deploy/secrets/", "tests/"))
        or (f.startswith("keys/") and f != "keys/models.pub")
        or f.endswith((".key", ".key.pem"))
    ]
    assert not leaked, f"the build context sends {leaked[:10]}"


def _as_mounted(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` as a read-only bind mount shows it: same owner, same
    mode (the container sees the host's)."""
    if source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            _as_mounted(child, target / child.name)
    else:
        shutil.copyfile(source, target)
    st = source.stat()
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, st.st_mode & 0o7777)


def test_the_compose_mosquitto_runs_the_generated_policy_as_its_own_user():
    """deploy/mosquitto/mosquitto.conf with the files `uns broker secure --broker-user`
    wrote, mounted where docker-compose.yml mounts them, started as root so that Mosquitto
    drops to its own user before it reads them (as in the image): it starts, refuses
    anonymous clients and wrong passwords, lets a service in with its password, serves TLS
    with the local CA's certificate, and the compose health check logs in and passes."""
    mosquitto = need("mosquitto")
    import pwd

    try:
        broker_user = pwd.getpwnam("mosquitto")
    except KeyError:
        missing("no mosquitto user (Debian's mosquitto package adds it)", ci="it must")
    if os.geteuid() != 0:
        missing("giving the files to the mosquitto user needs root", ci=".ci/run runs as root")
    spec = resolved()["services"]["mosquitto"]
    box = Path(tempfile.mkdtemp(prefix="uns-compose-"))  # not under a 0700 pytest directory
    os.chmod(box, 0o711)
    try:
        out = box / "generated"
        result = subprocess.run(
            [
                *(sys.executable, "-m", "uns", "broker", "secure", "--out", str(out)),
                *("--tls-host", "127.0.0.1", "--broker-user", "mosquitto"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        # the container's file system: every mount of the compose service, at its target
        root = box / "container"
        for mount in spec["volumes"]:
            source, target, *_ = mount.split(":")
            if not source.startswith("/") or source.endswith("mosquitto.conf"):
                continue
            where = root / target.lstrip("/")
            where.parent.mkdir(parents=True, exist_ok=True)
            for parent in [where.parent, *where.parent.parents]:
                if parent.is_relative_to(root):
                    os.chmod(parent, 0o755)
            _as_mounted(out / Path(source).relative_to(BROKER_SECRETS), where)
        data = root / "mosquitto/data"
        data.mkdir(parents=True)
        os.chown(data, broker_user.pw_uid, broker_user.pw_gid)
        plain, tls = free_port(), free_port()
        conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and "listener 8883\n" in conf
        conf = (
            conf.replace("/mosquitto/", f"{root}/mosquitto/")
            .replace("listener 1883\n", f"listener {plain} 127.0.0.1\n")
            .replace("listener 8883\n", f"listener {tls} 127.0.0.1\n")
            .replace("log_dest stdout", "log_dest stderr\nlog_type information")
        )
        assert "\nuser " not in conf  # the image's default: drop to user mosquitto
        (box / "mosquitto.conf").write_text(conf)
        proc = subprocess.Popen(
            [mosquitto, "-c", str(box / "mosquitto.conf")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            lines = Lines(proc.stdout, name="mosquitto")
            lines.wait_line(lambda line: " running" in line or "Error" in line, 30)
            assert "Error" not in lines.text(), lines.text()
            assert pwd.getpwuid(os.stat(f"/proc/{proc.pid}").st_uid).pw_name == "mosquitto"

            def sub(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
                return subprocess.run(
                    ["mosquitto_sub", *args],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env={"PATH": os.environ["PATH"], **(env or {})},
                )

            secret = (out / "secrets/featurizer.password").read_text().strip()
            once = ("-h", "127.0.0.1", "-t", "acme/pune/_node/featurizer/cmd", "-C", "1", "-W", "1")
            assert "not authorised" in sub("-p", str(plain), *once).stderr.lower()
            wrong = sub("-p", str(plain), "-u", "featurizer", "-P", "nope", *once)
            assert "not authorised" in wrong.stderr.lower()
            ok = sub("-p", str(plain), "-u", "featurizer", "-P", secret, *once)
            assert "not authorised" not in ok.stderr.lower() and "Timed out" in ok.stderr
            # TLS with the CA clients are given, by the name the certificate carries
            ca = str(out / "tls/ca.crt")
            over_tls = sub("-p", str(tls), "--cafile", ca, "-u", "featurizer", "-P", secret, *once)
            assert "Timed out" in over_tls.stderr, over_tls.stderr
            plain_to_tls = sub("-p", str(tls), "-u", "featurizer", "-P", secret, *once)
            assert "Timed out" not in plain_to_tls.stderr
            # the compose health check, with the environment compose gives it
            test = [
                arg.replace("$$", "$") for arg in spec["healthcheck"]["test"]
            ]  # compose's escape
            assert test[:2] == ["CMD", "mosquitto_sub"] and "-P" not in test
            home = spec["environment"]["XDG_CONFIG_HOME"].replace(
                "/mosquitto/", f"{root}/mosquitto/"
            )
            check = sub(*test[2:], "-p", str(plain), env={"XDG_CONFIG_HOME": home})
            assert check.returncode == 0 and check.stdout.strip(), check.stderr
            assert sub(*test[2:], "-p", str(plain)).returncode != 0  # without the login: no
        finally:
            proc.kill()
            proc.wait(10)
    finally:
        shutil.rmtree(box, ignore_errors=True)


# ---- the containers' health check, against a service that runs ---------------------------


async def health(port: int) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        str(HEALTHCHECK),
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode().strip()


async def health_until(port: int, code: int, interval: float = 0.2, retries: int = 150) -> str:
    """Run the check as Docker does, every ``interval``, until it exits ``code``; what it said."""
    for _ in range(retries):
        result, said = await health(port)
        if result == code:
            return said
        await asyncio.sleep(interval)
    raise AssertionError(f"the health check never exited {code}; last it said {said!r}")


async def test_the_health_check_says_healthy_only_while_the_service_is_on_the_broker(tmp_path):
    from uns_demo.service import DemoService

    broker = started_mosquitto(tmp_path)
    try:
        async with running(DemoService, broker.url, "acme", interval_s=0.5) as node:
            port = node.metrics._server.server_port
            assert await health(port) == (0, "")
            broker.kill()
            said = await health_until(port, 1)
            assert said == "not connected to the broker (uns_connected is 0)"
            broker.start()
            await health_until(port, 0)
    finally:
        broker.kill()
    code, said = await health(port)
    assert code == 1 and "does not answer" in said, said


def test_the_health_check_wants_one_port():
    result = subprocess.run(
        [sys.executable, "-I", str(HEALTHCHECK)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "usage" in result.stderr
