"""Checks of deploy/ that need no Docker, no Kubernetes and no systemd running.

Needs: pytest, PyYAML. Optional: the kora-sidecar binary ($KORA_SIDECAR_BIN, default
.build/debug/kora-sidecar, copied before use because a build may replace it) for `check-config`, the
metrics listener and the end-to-end runs; systemd-analyze for `systemd-analyze verify`; the
`standardwebhooks` package for a second opinion on the example app's signature check.
deploy/monitoring/ is checked by test_monitoring.py.

Run: python3 -m pytest tests/deploy -q
"""

import base64
import hashlib
import hmac
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROBE = DEPLOY / "kora-sidecar-probe"
PROBE_IN_IMAGE = "kora-sidecar-probe"
# storage.encryption.keys must be 32 bytes in base64, which the dummy secrets (with their whsec_ prefix) are not.
DUMMY_ENCRYPTION_KEY = base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()
# Where `serve` (and every other command) finds the configuration in the image when no --config is
# given: the image's CMD is plain `serve`, and the examples mount their config.json here.
SERVE_CONFIG = "/etc/kora-sidecar/config.json"
# Kora calls through the proxy wait up to kora.timeoutSeconds (default 30) before shutdown completes.
KORA_TIMEOUT_DEFAULT = 30

# Every variable an environment-only start reads once issue 14 is done, so that the
# files may set the new ones before the sources that read them have landed.
CONTRACT_ENVIRONMENT = {
    "KORAIDV_WEBHOOK_SECRET", "KORAIDV_API_KEY", "KORAIDV_TENANT_ID", "KORA_SIDECAR_FORWARD_URL",
    "KORA_SIDECAR_FORWARD_SOCKET", "KORA_SIDECAR_FORWARD_PATH", "KORA_SIDECAR_SIGNING_SECRET",
    "KORA_SIDECAR_CALLBACK_URL", "KORA_SIDECAR_API_BASE_URL", "KORA_SIDECAR_WEBHOOK_PORT",
    "KORA_SIDECAR_INTERNAL_PORT", "KORA_SIDECAR_DELIVERY_MODE", "KORA_SIDECAR_SQLITE_PATH",
    "KORA_SIDECAR_DATABASE_URL", "KORA_SIDECAR_LOG_LEVEL", "KORA_SIDECAR_LOG_FORMAT",
    "KORA_SIDECAR_INTERNAL_HOST", "KORA_SIDECAR_INTERNAL_SOCKET", "KORA_SIDECAR_SERVICE_TOKEN",
    "KORA_SIDECAR_ADMIN_TOKEN", "KORA_SIDECAR_EVENTS", "KORA_SIDECAR_DELIVERY_FORMAT",
    "KORA_SIDECAR_METRICS_PORT", "KORA_SIDECAR_CONFIG",
}


# ---------------------------------------------------------------------------------------------
# helpers


def load_yaml_documents(path):
    with open(path) as handle:
        return [document for document in yaml.safe_load_all(handle) if document is not None]


def load_yaml(path):
    (document,) = load_yaml_documents(path)
    return document


def env_references(value, path="$"):
    """{"env": NAME} secrets in a configuration document: {NAME: json path}."""
    found = {}
    if isinstance(value, dict):
        if set(value) == {"env"}:
            return {value["env"]: path}
        for key, member in value.items():
            found.update(env_references(member, f"{path}.{key}"))
    elif isinstance(value, list):
        for index, member in enumerate(value):
            found.update(env_references(member, f"{path}[{index}]"))
    return found


def swift_sources():
    """Every Swift file under Sources/, whatever the targets are called."""
    files = sorted((ROOT / "Sources").rglob("*.swift"))
    assert files, "no Swift sources under Sources/"
    return files


def sidecar_environment_variables():
    """The variables the sidecar reads: the string literals in its sources, and the contract's list."""
    names = set()
    for path in swift_sources():
        names |= set(re.findall(r'"((?:KORAIDV|KORA_SIDECAR)_[A-Z0-9_]+)"', path.read_text()))
    assert "KORAIDV_WEBHOOK_SECRET" in names, "could not read the variables from the Swift sources"
    return names | CONTRACT_ENVIRONMENT


def drain_seconds():
    """The default of delivery.drainTimeout, the sidecar's delivery drain time on shutdown."""
    for path in swift_sources():
        match = re.search(r"drainTimeout = Duration\.seconds\((\d+)\)", path.read_text())
        if match:
            return int(match.group(1))
    raise AssertionError("the delivery.drainTimeout default was not found under Sources/")


def shutdown_budget_seconds(config):
    """What a clean stop may take: the delivery drain plus a proxied call waiting for Kora."""
    return drain_seconds() + config.get("kora", {}).get("timeoutSeconds", KORA_TIMEOUT_DEFAULT)


def seconds(text):
    match = re.fullmatch(r"(\d+)\s*(ms|s|min|m|h)?", str(text).strip())
    assert match, f"not a duration: {text!r}"
    value, unit = int(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}[unit]


def compose_default(value):
    """The value compose uses when the variable is unset: ${NAME:-default} -> default."""
    match = re.fullmatch(r"\$\{([A-Z0-9_]+):-(.*)\}", value)
    return match.group(2) if match else value


def option(arguments, flag):
    assert flag in arguments, f"{flag} missing from {arguments}"
    return arguments[arguments.index(flag) + 1]


def mount_target(volume):
    return volume.split(":")[1] if isinstance(volume, str) else volume["target"]


def mount_source(volume):
    return volume.split(":")[0] if isinstance(volume, str) else volume.get("source")


def directory_of(path):
    return str(PurePosixPath(path).parent)


def is_whsec(secret):
    text = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        return len(base64.b64decode(text, validate=True)) >= 16
    except ValueError:
        return False


@pytest.fixture(scope="session")
def sidecar_bin(tmp_path_factory):
    """A private copy of the binary: a build running meanwhile may replace or remove the original."""
    path = Path(os.environ.get("KORA_SIDECAR_BIN", ROOT / ".build/debug/kora-sidecar"))
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"the kora-sidecar binary is absent at {path} (build it, or set KORA_SIDECAR_BIN)")
    copy = tmp_path_factory.mktemp("bin") / "kora-sidecar"
    shutil.copy2(path, copy)
    return copy


def check_config(binary, config_path, environment):
    """Runs `kora-sidecar check-config` with exactly `environment`; returns the effective configuration."""
    result = subprocess.run(
        [str(binary), "check-config", "--config", str(config_path)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environment},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"check-config rejected {config_path}:\n{result.stderr}{result.stdout}"
    return json.loads(result.stdout)


def dummy_environment(config):
    """A value for every variable the configuration names: each its own (two services may not share a
    token), each a valid Standard Webhooks secret (signing secrets must be)."""
    return {name: "whsec_" + base64.b64encode(hashlib.sha256(name.encode()).digest()).decode() for name in env_references(config)}


def load_app_module():
    spec = importlib.util.spec_from_file_location("kora_example_app", DEPLOY / "compose/app/app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# the files


COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "compose/config.json"
K8S = DEPLOY / "kubernetes"
SYSTEMD_UNIT = DEPLOY / "systemd/kora-sidecar.service"
SYSTEMD_CONFIG = DEPLOY / "systemd/config.json"
SYSTEMD_ENV = DEPLOY / "systemd/kora-sidecar.env.example"
DOCKERFILE = DEPLOY / "Dockerfile"


def kubernetes_objects():
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in load_yaml_documents(path):
            objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def kubernetes_one(kind):
    (found,) = [value for (k, _), value in kubernetes_objects().items() if k == kind]
    return found


def kubernetes_config():
    return json.loads(kubernetes_one("ConfigMap")["data"]["config.json"])


def kubernetes_workload():
    """The single-pod example: a StatefulSet, so the store's volume claim outlives the pod."""
    return kubernetes_one("StatefulSet")


def pod_containers():
    containers = kubernetes_workload()["spec"]["template"]["spec"]["containers"]
    return {container["name"]: container for container in containers}


def sidecar_container():
    (container,) = [c for c in pod_containers().values() if "kora-sidecar" in c["image"]]
    return container


def app_container():
    (container,) = [c for c in pod_containers().values() if "kora-sidecar" not in c["image"]]
    return container


def container_env(container):
    return {entry["name"]: entry for entry in container.get("env", [])}


def systemd_directives(path):
    """[(section, key, value)] of a unit file, keeping repeated keys."""
    directives, section = [], None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        directives.append((section, key.strip(), value.strip()))
    return directives


def systemd_value(path, key):
    values = [value for _, k, value in systemd_directives(path) if k == key]
    assert values, f"{key}= missing from {path.name}"
    return values[-1]


def env_file(path):
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# ---------------------------------------------------------------------------------------------
# everything parses


def test_every_yaml_and_json_file_parses():
    yaml_files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    json_files = sorted(DEPLOY.rglob("*.json"))
    assert len(yaml_files) >= 5 and len(json_files) >= 2
    for path in yaml_files:
        assert load_yaml_documents(path), f"{path} holds no YAML document"
    for path in json_files:
        json.loads(path.read_text())
    assert isinstance(kubernetes_config(), dict)


@pytest.mark.parametrize("name", ["compose", "kubernetes", "systemd"])
def test_config_passes_check_config(sidecar_bin, tmp_path, name):
    if name == "compose":
        config, path = json.loads(COMPOSE_CONFIG.read_text()), COMPOSE_CONFIG
    elif name == "kubernetes":
        config, path = kubernetes_config(), tmp_path / "config.json"
        path.write_text(json.dumps(config))
    else:
        config, path = json.loads(SYSTEMD_CONFIG.read_text()), SYSTEMD_CONFIG
    effective = check_config(sidecar_bin, path, dummy_environment(config))
    assert effective["webhooks"]["secrets"] == ["***"] * len(config["webhooks"]["secrets"])


def test_compose_demo_defaults_pass_check_config(sidecar_bin):
    """`docker compose up` with nothing set must start: the demo defaults are valid secrets."""
    environment = {key: compose_default(value) for key, value in compose_service("sidecar")["environment"].items()}
    check_config(sidecar_bin, COMPOSE_CONFIG, environment)


# ---------------------------------------------------------------------------------------------
# docker compose


def compose_service(name):
    return load_yaml(COMPOSE)["services"][name]


def test_compose_has_the_three_services():
    assert set(load_yaml(COMPOSE)["services"]) == {"kora", "sidecar", "app"}
    assert compose_service("kora")["command"][0] == "simulate"
    # The sidecar runs the image's own command (plain `serve`), which finds the mounted file.
    assert compose_service("sidecar").get("command", ["serve"]) == ["serve"] == image_command()


def test_compose_sidecar_environment_is_what_the_config_references():
    config = json.loads(COMPOSE_CONFIG.read_text())
    environment = compose_service("sidecar")["environment"]
    missing = set(env_references(config)) - set(environment)
    assert not missing, f"config.json references variables the sidecar service does not set: {missing}"
    unused = set(environment) - set(env_references(config)) - sidecar_environment_variables()
    assert not unused, f"variables set on the sidecar that nothing reads: {unused}"


def test_compose_mounts_config_store_and_sockets():
    config = json.loads(COMPOSE_CONFIG.read_text())
    sidecar, app = compose_service("sidecar"), compose_service("app")
    sidecar_mounts = {mount_target(v): mount_source(v) for v in sidecar["volumes"]}
    app_mounts = {mount_target(v): mount_source(v) for v in app["volumes"]}
    assert (DEPLOY / sidecar_mounts[SERVE_CONFIG]).resolve() == COMPOSE_CONFIG.resolve()
    store_directory = directory_of(config["storage"]["sqlitePath"])
    assert sidecar_mounts.get(store_directory) in load_yaml(COMPOSE)["volumes"], "the store is not on a volume"
    socket_directory = directory_of(config["services"][0]["deliver"]["unixSocket"])
    assert sidecar_mounts[socket_directory] == app_mounts[socket_directory], "the socket directory is not shared"
    assert sidecar_mounts[socket_directory] in load_yaml(COMPOSE)["volumes"]
    assert (DEPLOY / app_mounts["/app"]).resolve() == (DEPLOY / "compose/app").resolve()
    assert app["command"][-1] == "/app/app.py"


def test_compose_ports_paths_and_urls_agree_with_the_config():
    config = json.loads(COMPOSE_CONFIG.read_text())
    webhooks, internal = config["webhooks"], config["internal"]["listen"]
    kora, sidecar, app = compose_service("kora"), compose_service("sidecar"), compose_service("app")

    published = [str(port).rsplit(":", 1)[-1] for port in sidecar["ports"]]
    assert published == [str(webhooks["listen"]["port"])], "publish the webhook port, and only it"
    assert sidecar["healthcheck"]["test"] == ["CMD", PROBE_IN_IMAGE, f"127.0.0.1:{internal['port']}", "/readyz"]
    assert internal["host"] == "127.0.0.1"

    webhook_url = f"http://sidecar:{webhooks['listen']['port']}{webhooks['path']}"
    assert option(kora["command"], "--webhook-url") == webhook_url
    assert config["kora"]["callbackURL"] == webhook_url
    assert config["kora"]["apiBaseURL"] == f"http://kora:{option(kora['command'], '--port')}/api/v1/idv"
    assert option(kora["command"], "--webhook-secret") == sidecar["environment"]["KORAIDV_WEBHOOK_SECRET"]

    # The app shares the sidecar's network namespace, so the loopback-only internal listener is its API.
    assert app["network_mode"] == "service:sidecar"
    assert app["environment"]["SIDECAR_API_URL"] == f"http://127.0.0.1:{internal['port']}"
    deliver = config["services"][0]["deliver"]
    assert app["environment"]["APP_SOCKET"] == deliver["unixSocket"]
    assert app["environment"]["APP_EVENTS_PATH"] == deliver["path"]
    signing_variable = deliver["signingSecret"]["env"]
    assert app["environment"]["APP_WEBHOOK_SECRET"] == sidecar["environment"][signing_variable]
    assert is_whsec(compose_default(app["environment"]["APP_WEBHOOK_SECRET"]))


def test_compose_users_share_the_sidecar_group_and_stop_after_the_drain():
    gid = re.search(r"groupadd .*--gid (\d+)", DOCKERFILE.read_text()).group(1)
    assert compose_service("app")["user"].split(":")[1] == gid
    assert seconds(compose_service("sidecar")["stop_grace_period"]) >= shutdown_budget_seconds(
        json.loads(COMPOSE_CONFIG.read_text()))


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_kubernetes_service_exposes_only_the_webhook_port():
    service = kubernetes_one("Service")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    container_ports = {p["name"]: p["containerPort"] for p in sidecar_container()["ports"]}
    target = container_ports.get(port["targetPort"], port["targetPort"])
    assert target == kubernetes_config()["webhooks"]["listen"]["port"] == 8080
    pod_labels = kubernetes_workload()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert kubernetes_workload()["spec"]["serviceName"] == service["metadata"]["name"]


def test_kubernetes_metrics_listener_is_scrapable_and_the_proxy_is_not_exposed():
    config = kubernetes_config()
    metrics = config["metrics"]["listen"]
    assert metrics["host"] == "0.0.0.0", "Prometheus connects to the pod IP"
    assert config["internal"]["listen"]["host"] == "127.0.0.1", "the API proxy must stay on loopback"
    container_ports = {p["name"]: p["containerPort"] for p in sidecar_container()["ports"]}
    assert container_ports == {"webhooks": config["webhooks"]["listen"]["port"], "metrics": metrics["port"]}
    assert config["internal"]["listen"]["port"] not in container_ports.values()
    annotations = kubernetes_workload()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics["port"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_probes_hit_readyz_and_healthz_on_the_right_ports():
    config = kubernetes_config()
    sidecar = sidecar_container()
    internal = config["internal"]["listen"]
    readiness = sidecar["readinessProbe"]["exec"]["command"]
    assert readiness == [PROBE_IN_IMAGE, f"{internal['host']}:{internal['port']}", "/readyz"]
    # Liveness stays off the public listener, whose connections anyone can fill.
    liveness = sidecar["livenessProbe"]["exec"]["command"]
    assert liveness == [PROBE_IN_IMAGE, f"{internal['host']}:{internal['port']}", "/healthz"]


def test_kubernetes_secrets_come_from_the_secret_and_match_the_config():
    config = kubernetes_config()
    secret = kubernetes_one("Secret")
    environment = container_env(sidecar_container())
    references = set(env_references(config))
    assert references <= set(environment), f"not set in the pod: {references - set(environment)}"
    assert not set(environment) - references - sidecar_environment_variables()
    for name in references:
        source = environment[name]["valueFrom"]["secretKeyRef"]
        assert source["name"] == secret["metadata"]["name"]
        assert source["key"] in secret["stringData"]
    app_secret = container_env(app_container())["APP_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    assert app_secret == environment[config["services"][0]["deliver"]["signingSecret"]["env"]]["valueFrom"]["secretKeyRef"]


def test_kubernetes_volumes_config_store_and_socket():
    config = kubernetes_config()
    pod = kubernetes_workload()["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    sidecar, app = sidecar_container(), app_container()
    sidecar_mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    app_mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}

    # The image's own command: plain `serve`, which reads the file mounted at SERVE_CONFIG.
    assert "command" not in sidecar and sidecar.get("args", ["serve"]) == ["serve"] == image_command()
    config_volume = volumes[sidecar_mounts[directory_of(SERVE_CONFIG)]]
    assert config_volume["configMap"]["name"] == kubernetes_one("ConfigMap")["metadata"]["name"]
    assert PurePosixPath(SERVE_CONFIG).name in kubernetes_one("ConfigMap")["data"]

    socket = config["services"][0]["deliver"]["unixSocket"]
    assert sidecar_mounts[directory_of(socket)] == app_mounts[directory_of(socket)]
    assert "emptyDir" in volumes[app_mounts[directory_of(socket)]]
    assert container_env(app)["APP_SOCKET"]["value"] == socket
    assert container_env(app)["APP_EVENTS_PATH"]["value"] == config["services"][0]["deliver"]["path"]
    assert container_env(app)["SIDECAR_API_URL"]["value"] == f"http://127.0.0.1:{config['internal']['listen']['port']}"


def test_kubernetes_store_outlives_the_pod():
    """Queued mode answers Kora 200 once the event is stored: the store must be on a volume claim."""
    config = kubernetes_config()
    workload = kubernetes_workload()
    assert config.get("delivery", {}).get("mode", "queued") == "queued"
    assert workload["spec"]["replicas"] == 1, "one replica per SQLite store"
    store_directory = directory_of(config["storage"]["sqlitePath"])
    mounts = {m["mountPath"]: m["name"] for m in sidecar_container()["volumeMounts"]}
    claims = {claim["metadata"]["name"]: claim for claim in workload["spec"]["volumeClaimTemplates"]}
    pod_volumes = {volume["name"] for volume in workload["spec"]["template"]["spec"]["volumes"]}
    name = mounts[store_directory]
    assert name in claims and name not in pod_volumes, "the store must be on the volume claim, not a pod volume"
    assert claims[name]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims[name]["spec"]["resources"]["requests"]["storage"]
    # The group that owns the claim's files is the sidecar's, so uid 10001 can write the store.
    gid = int(re.search(r"groupadd .*--gid (\d+)", DOCKERFILE.read_text()).group(1))
    assert workload["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == gid


def test_kubernetes_pod_is_hardened_and_sized():
    pod = kubernetes_workload()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > shutdown_budget_seconds(kubernetes_config())
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["runAsUser"] != 0, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text()).group(1)
    assert sidecar_container()["securityContext"]["runAsUser"] == int(uid)


# ---------------------------------------------------------------------------------------------
# systemd


def test_systemd_unit_is_hardened():
    directives = {(key, value) for _, key, value in systemd_directives(SYSTEMD_UNIT)}
    for expected in [
        ("User", "kora-sidecar"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"), ("StateDirectory", "kora-sidecar"), ("RuntimeDirectory", "kora-sidecar"),
        ("CapabilityBoundingSet", ""), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"), ("MemoryDenyWriteExecute", "yes"), ("LockPersonality", "yes"),
        ("Restart", "on-failure"), ("EnvironmentFile", "/etc/kora-sidecar/kora-sidecar.env"),
        ("ExecStart", f"/usr/local/bin/kora-sidecar serve --config {SERVE_CONFIG}"),
    ]:
        assert expected in directives, f"{expected[0]}={expected[1]} missing"
    assert seconds(systemd_value(SYSTEMD_UNIT, "TimeoutStopSec")) > shutdown_budget_seconds(
        json.loads(SYSTEMD_CONFIG.read_text()))


def test_systemd_store_is_the_service_users_alone():
    """The app's user joins the kora-sidecar group for the socket: the group may enter the runtime
    directory, but not the state directory with the store (idempotency records, identity data)."""
    assert int(systemd_value(SYSTEMD_UNIT, "StateDirectoryMode"), 8) == 0o700
    assert int(systemd_value(SYSTEMD_UNIT, "RuntimeDirectoryMode"), 8) & 0o010, "the group cannot reach the socket"
    assert directory_of(json.loads(SYSTEMD_CONFIG.read_text())["storage"]["sqlitePath"]) == \
        "/var/lib/" + systemd_value(SYSTEMD_UNIT, "StateDirectory")


def test_systemd_config_uses_the_unit_directories_and_env_file():
    config = json.loads(SYSTEMD_CONFIG.read_text())
    state = "/var/lib/" + systemd_value(SYSTEMD_UNIT, "StateDirectory")
    runtime = "/run/" + systemd_value(SYSTEMD_UNIT, "RuntimeDirectory")
    assert config["storage"]["sqlitePath"].startswith(state + "/")
    assert config["internal"]["listen"]["unixSocket"].startswith(runtime + "/")
    environment = env_file(SYSTEMD_ENV)
    assert set(env_references(config)) <= set(environment)
    assert not set(environment) - set(env_references(config)) - sidecar_environment_variables()


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path, request):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists: point it at a copy (or a stand-in) in tmp_path.
    binary = Path(os.environ.get("KORA_SIDECAR_BIN", ROOT / ".build/debug/kora-sidecar"))
    executable = tmp_path / "kora-sidecar"
    if binary.is_file():
        os.symlink(binary.resolve(), executable)
    else:
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(SYSTEMD_UNIT.read_text().replace("ExecStart=/usr/local/bin/kora-sidecar ", f"ExecStart={executable} "))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if SYSTEMD_UNIT.name in line]
    assert result.returncode == 0 and not complaints, "\n".join(complaints) or result.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def runtime_instructions():
    instructions = dockerfile_instructions()
    return instructions[instructions.index("FROM debian:bookworm-slim"):]


def image_command():
    """The runtime image's CMD, as a list."""
    (cmd,) = [i for i in runtime_instructions() if i.startswith("CMD ")]
    return json.loads(cmd[len("CMD "):])


def image_environment():
    """The runtime image's ENV NAME=value settings."""
    found = {}
    for instruction in runtime_instructions():
        if instruction.startswith("ENV "):
            for pair in instruction[len("ENV "):].split():
                name, _, value = pair.partition("=")
                found[name] = value
    return found


def test_dockerfile_builds_like_ci():
    text = DOCKERFILE.read_text()
    assert "swift build -c release --static-swift-stdlib" in text
    ci = ROOT / ".ci/run"
    if ci.exists():
        for line in ci.read_text().splitlines():
            if "swift build" in line and "-c release" in line:
                flags = line[line.index("swift build"):].split("#")[0].strip()
                assert flags.split("--product")[0].strip() in text, f"CI builds with `{flags}`"


def test_dockerfile_builder_tag_matches_the_toolchain():
    version = re.search(r"ARG SWIFT_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    assert re.search(r"^FROM swift:\$\{SWIFT_VERSION\}-bookworm AS build$", DOCKERFILE.read_text(), re.M)
    swift = shutil.which("swift")
    if not swift:
        pytest.skip("no swift toolchain here to compare the builder tag with")
    output = subprocess.run([swift, "--version"], capture_output=True, text=True, timeout=60).stdout
    local = re.search(r"Swift version (\d+\.\d+(?:\.\d+)?)", output).group(1)
    assert version == local, f"builder image swift:{version} but the toolchain is {local}"


def test_dockerfile_runtime_stage():
    instructions = dockerfile_instructions()
    stages = [i for i in instructions if i.startswith("FROM ")]
    assert len(stages) == 2 and stages[1] == "FROM debian:bookworm-slim"
    runtime = instructions[instructions.index("FROM debian:bookworm-slim"):]
    (install,) = [i for i in runtime if "apt-get install" in i]
    packages = set(install.split("apt-get install", 1)[1].split("&&")[0].split()) - {"-y", "--no-install-recommends"}
    assert packages == {"libsqlite3-0", "ca-certificates"}
    assert "USER 10001:10001" in runtime
    assert 'VOLUME ["/data"]' in runtime
    assert [i for i in runtime if i.startswith("EXPOSE")] == ["EXPOSE 8080"]
    assert 'ENTRYPOINT ["kora-sidecar"]' in runtime
    # Plain `serve`: the configuration at SERVE_CONFIG when mounted, else the environment alone, so
    # `docker exec <c> kora-sidecar deliveries list` (no flags) finds what serve uses.
    assert image_command() == ["serve"]
    # An environment-only start keeps its store on the /data volume, not in the working directory.
    assert image_environment()["KORA_SIDECAR_SQLITE_PATH"] == "/data/kora-sidecar.sqlite"
    assert directory_of(image_environment()["KORA_SIDECAR_SQLITE_PATH"]) in json.loads(
        [i for i in runtime if i.startswith("VOLUME ")][0][len("VOLUME "):])
    assert set(image_environment()) <= sidecar_environment_variables()
    (healthcheck,) = [i for i in runtime if i.startswith("HEALTHCHECK")]
    assert f'CMD ["{PROBE_IN_IMAGE}", "127.0.0.1:8081", "/readyz"]' in healthcheck
    copies = [i for i in runtime if i.startswith("COPY")]
    assert not [c for c in copies if "config" in c or ".env" in c], "configuration or secrets baked into the image"


def test_dockerfile_ships_a_stripped_binary():
    """The binary copied into the runtime image is stripped in the build stage."""
    instructions = dockerfile_instructions()
    build = instructions[:instructions.index("FROM debian:bookworm-slim")]
    (copy,) = [i for i in runtime_instructions() if i.startswith("COPY --from=build")]
    shipped = copy.split()[2]
    (produce,) = [i for i in build if shipped in i]
    stripped = (re.search(rf"install\b[^&]*(?:--strip|\s-s\b)[^&]*{re.escape(shipped)}", produce)
                or re.search(rf"\bstrip\b[^&]*{re.escape(shipped)}", produce)
                or "-Xlinker -s" in produce)
    assert stripped, f"{shipped} is not stripped: {produce}"
    text = DOCKERFILE.read_text()
    assert re.search(r"^#.*strip", text, re.M | re.I), "say why the binary is stripped"


def test_dockerignore_lets_every_copied_file_through():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for instruction in dockerfile_instructions():
        if instruction.startswith("COPY") and "--from=" not in instruction:
            for source in instruction.split()[1:-1]:
                if source.startswith("--"):
                    continue
                assert source in allowed or any(re.fullmatch(source.replace(".", r"\.").replace("*", ".*"), a) for a in allowed), source


# ---------------------------------------------------------------------------------------------
# the probe script used by HEALTHCHECK and the readiness probe


@pytest.fixture
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status = 200 if self.path == "/readyz" else 503
            body = json.dumps({"status": "ready" if status == 200 else "not ready"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port, path):
    return subprocess.run([str(PROBE), f"127.0.0.1:{port}", path], capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(not shutil.which("bash"), reason="bash is not installed")
def test_probe_script_reports_the_status(http_server):
    ok = probe(http_server, "/readyz")
    assert ok.returncode == 0 and '"ready"' in ok.stdout
    not_ready = probe(http_server, "/other")
    assert not_ready.returncode == 1 and "503" in not_ready.stdout
    assert probe(free_port(), "/readyz").returncode == 1


# ---------------------------------------------------------------------------------------------
# the example app's signature check


def reference_signature(secret, msg_id, timestamp, body):
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_app_verify_agrees_with_a_known_vector():
    app = load_app_module()
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"id":"evt_1","type":"verification.completed"}'
    msg_id, timestamp = "evt_1", 1700000000
    signature = reference_signature(secret, msg_id, timestamp, body)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}

    assert app.verify(secret, headers, body, now=timestamp + 10)
    assert app.verify(secret, {k.title(): v for k, v in headers.items()}, body, now=timestamp)
    assert app.verify(secret, {**headers, "webhook-signature": "v1,AAAA " + signature}, body, now=timestamp)
    assert not app.verify(secret, headers, body + b" ", now=timestamp)
    assert not app.verify(secret, {**headers, "webhook-id": "evt_2"}, body, now=timestamp)
    assert not app.verify("whsec_" + base64.b64encode(b"another-secret-16b").decode(), headers, body, now=timestamp)
    assert not app.verify(secret, headers, body, now=timestamp + 301)
    assert not app.verify(secret, {**headers, "webhook-signature": "v2," + signature[3:]}, body, now=timestamp)
    assert not app.verify(secret, {k: v for k, v in headers.items() if k != "webhook-timestamp"}, body, now=timestamp)


def test_app_verify_agrees_with_the_standardwebhooks_library():
    standardwebhooks = pytest.importorskip("standardwebhooks", reason="the standardwebhooks package is not installed")
    from datetime import datetime, timezone

    app = load_app_module()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    body = b'{"id":"evt_9","type":"fraud_alert.created","verification":null}'
    now = int(time.time())
    library = standardwebhooks.Webhook(secret)
    signature = library.sign("evt_9", datetime.fromtimestamp(now, tz=timezone.utc), body.decode())
    headers = {"webhook-id": "evt_9", "webhook-timestamp": str(now), "webhook-signature": signature}
    assert signature == reference_signature(secret, "evt_9", now, body)
    assert app.verify(secret, headers, body)
    library.verify(body, headers)  # raises when the library disagrees


def test_the_example_app_receives_events_from_the_real_sidecar(sidecar_bin, tmp_path):
    """The compose flow without Docker: kora-sidecar delivers over a Unix socket to app.py."""
    app = load_app_module()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    received = []
    server = app.serve(str(tmp_path / "app.sock"), secret, "/kora-events", lambda event, headers: received.append(event))
    webhook_port, internal_port = free_port(), free_port()
    config = json.loads(COMPOSE_CONFIG.read_text())
    config["kora"] = {}
    config["webhooks"]["listen"] = {"host": "127.0.0.1", "port": webhook_port}
    config["internal"]["listen"] = {"host": "127.0.0.1", "port": internal_port}
    config["services"][0]["deliver"]["unixSocket"] = str(tmp_path / "app.sock")
    config["storage"]["sqlitePath"] = str(tmp_path / "kora-sidecar.sqlite")
    (tmp_path / "config.json").write_text(json.dumps(config))
    environment = {"PATH": os.environ.get("PATH", ""), **dummy_environment(config)}
    environment[config["services"][0]["deliver"]["signingSecret"]["env"]] = secret
    environment[config["webhooks"]["secrets"][0]["env"]] = "kora-webhook-secret"
    sidecar = subprocess.Popen(
        [str(sidecar_bin), "serve", "--config", str(tmp_path / "config.json")],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while probe(internal_port, "/readyz").returncode != 0:
            assert sidecar.poll() is None and time.time() < deadline, "the sidecar did not become ready"
            time.sleep(0.2)
        sent = subprocess.run(
            [str(sidecar_bin), "send-test-event", "--to", f"http://127.0.0.1:{webhook_port}{config['webhooks']['path']}",
             "--secret", "kora-webhook-secret", "--external-id", "test-approve-deploy"],
            capture_output=True, text=True, timeout=30)
        assert sent.stdout.startswith("200"), sent.stdout + sent.stderr
        while not received:
            assert time.time() < deadline, "the app received no event (a signature it rejected?)"
            time.sleep(0.1)
        assert received[0]["verification"]["externalId"] == "test-approve-deploy"
    finally:
        output = stop(sidecar)
        server.shutdown()
    assert sidecar.returncode == 0, output


# ---------------------------------------------------------------------------------------------
# kubernetes: two replicas sharing PostgreSQL

K8S_REPLICAS = K8S / "replicas-postgres"


def replicas_objects():
    objects = {}
    for path in sorted(K8S_REPLICAS.glob("*.yaml")):
        for document in load_yaml_documents(path):
            objects.setdefault(document["kind"], []).append(document)
    return objects


def replicas_config():
    (config_map,) = replicas_objects()["ConfigMap"]
    return json.loads(config_map["data"]["config.json"])


def test_replicas_config_passes_check_config_with_a_postgres_url(sidecar_bin, tmp_path):
    config, path = replicas_config(), tmp_path / "config.json"
    path.write_text(json.dumps(config))
    environment = dummy_environment(config)
    environment["KORA_SIDECAR_DATABASE_URL"] = "postgres://kora:pg-secret-value@db:5432/kora?sslmode=require"
    environment["KORA_SIDECAR_ENCRYPTION_KEY"] = DUMMY_ENCRYPTION_KEY
    effective = check_config(sidecar_bin, path, environment)
    assert effective["storage"] == {
        "postgresURL": "***",
        "encryption": {"keys": [{"id": "2026-11", "key": "***"}]},
        "payloadRetention": "1d",
        "deadRetention": "7d",
    }
    assert "pg-secret-value" not in json.dumps(effective)
    assert DUMMY_ENCRYPTION_KEY not in json.dumps(effective)


def test_replicas_share_postgres_and_every_variable_comes_from_the_secret():
    objects, config = replicas_objects(), replicas_config()
    (deployment,) = objects["Deployment"]
    (secret,) = objects["Secret"]
    assert deployment["spec"]["replicas"] >= 2
    # PostgreSQL requires encryption keys: every replica seals stored bodies with the same key, from the Secret.
    assert config["storage"] == {
        "postgresURL": {"env": "KORA_SIDECAR_DATABASE_URL"},
        "encryption": {"keys": [{"id": "2026-11", "key": {"env": "KORA_SIDECAR_ENCRYPTION_KEY"}}]},
    }
    assert secret["stringData"]["KORA_SIDECAR_DATABASE_URL"].startswith("postgres://")
    assert "KORA_SIDECAR_ENCRYPTION_KEY" in secret["stringData"]
    assert set(env_references(config)) <= set(secret["stringData"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    # Nothing on a pod's disk: no volume but the configuration and /tmp.
    volumes = {volume["name"] for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"config", "tmp"}


def test_replicas_internal_listener_is_token_protected_and_probed():
    objects, config = replicas_objects(), replicas_config()
    (deployment,) = objects["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"webhooks": config["webhooks"]["listen"]["port"], "internal": config["internal"]["listen"]["port"],
                     "metrics": config["metrics"]["listen"]["port"]}
    assert "command" not in container and container.get("args", ["serve"]) == ["serve"] == image_command()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (config_map,) = objects["ConfigMap"]
    assert volumes[mounts[directory_of(SERVE_CONFIG)]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown_budget_seconds(config)
    # Reachable from the cluster, so every service must present its own token.
    assert config["internal"]["listen"]["host"] == "0.0.0.0"
    assert all("token" in service for service in config["services"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "internal"}
    # The readiness answer may wait for the store's 5 s operation time-out.
    assert container["readinessProbe"]["timeoutSeconds"] > 5
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in objects["Service"]:
        assert service["spec"]["selector"].items() <= labels.items()
    (budget,) = objects["PodDisruptionBudget"]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_replicas_metrics_listener_is_scrapable_without_the_proxy():
    objects, config = replicas_objects(), replicas_config()
    (deployment,) = objects["Deployment"]
    metrics = config["metrics"]["listen"]
    assert metrics["host"] == "0.0.0.0" and metrics["port"] != config["internal"]["listen"]["port"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics["port"])
    assert annotations["prometheus.io/path"] == "/metrics"
    # No Service publishes the metrics port: Prometheus scrapes the pods.
    for service in objects["Service"]:
        assert "metrics" not in {port["targetPort"] for port in service["spec"]["ports"]}


def network_policy_rules():
    """{port name: [from entries]} of the replicas' NetworkPolicy, and the policy."""
    objects = replicas_objects()
    (deployment,) = objects["Deployment"]
    (policy,) = objects["NetworkPolicy"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    rules = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port"
        assert rule.get("from"), "a rule without from admits everyone"
        for port in rule["ports"]:
            rules.setdefault(port["port"], []).extend(rule["from"])
    return rules


def test_replicas_network_policy_keeps_the_proxy_in_the_namespace():
    rules = network_policy_rules()
    (container,) = replicas_objects()["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert set(rules) == {port["name"] for port in container["ports"]}, "name every container port, no other"
    # The API proxy: pods of the policy's own namespace only (a podSelector without namespaceSelector).
    assert rules["internal"] == [{"podSelector": {}}]
    # Webhooks from the ingress controller's namespace; metrics from the monitoring namespace.
    (webhooks,) = rules["webhooks"]
    assert set(webhooks) == {"namespaceSelector"} and webhooks["namespaceSelector"]["matchLabels"]
    (metrics,) = rules["metrics"]
    assert metrics == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_replicas_services_are_in_the_proxy_namespace():
    """The services that call the proxy are the namespace's own: the NetworkPolicy admits only them."""
    config, (deployment,) = replicas_config(), replicas_objects()["Deployment"]
    namespace = deployment["metadata"]["namespace"]
    for service in config["services"]:
        host = re.match(r"https?://([^/:]+)", service["deliver"]["url"]).group(1)
        assert "." not in host or host.split(".")[1] == namespace, f"{service['name']} is outside {namespace}"



# ---------------------------------------------------------------------------------------------
# the real binary with the deploy files' shape


def http_get(port, path, timeout=10):
    """(status, body) of GET http://127.0.0.1:port/path; status None when nothing answers."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return None, ""


def wait_until(condition, process, what, seconds_left=30):
    deadline = time.time() + seconds_left
    while not condition():
        assert process.poll() is None, f"the sidecar exited while waiting until {what}"
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def stop(process):
    process.terminate()
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def test_kubernetes_metrics_listener_serves_metrics_and_nothing_else(sidecar_bin, tmp_path):
    """The ConfigMap's metrics listener answers METRICS_LISTENER_PATHS; the proxy, the admin API and
    the webhook path are not on it."""
    config = kubernetes_config()
    webhook_port, internal_port, metrics_port = free_port(), free_port(), free_port()
    config["webhooks"]["listen"] = {"host": "127.0.0.1", "port": webhook_port}
    config["internal"]["listen"] = {"host": "127.0.0.1", "port": internal_port}
    config["metrics"]["listen"] = {"host": "127.0.0.1", "port": metrics_port}
    config["services"][0]["deliver"]["unixSocket"] = str(tmp_path / "app.sock")
    config["storage"]["sqlitePath"] = str(tmp_path / "data/kora-sidecar.sqlite")
    (tmp_path / "config.json").write_text(json.dumps(config))
    sidecar = subprocess.Popen(
        [str(sidecar_bin), "serve", "--config", str(tmp_path / "config.json")],
        env={"PATH": os.environ.get("PATH", ""), **dummy_environment(config)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: http_get(internal_port, "/readyz")[0] == 200, sidecar, "/readyz answers 200")
        status, body = http_get(metrics_port, "/metrics")
        assert status == 200, body
        assert re.search(r"^kora_sidecar_ready(\{[^}]*\})? 1(\.0)?$", body, re.M), body
        assert "kora_sidecar_outbox_depth" in body
        for path in METRICS_LISTENER_PATHS:
            assert http_get(metrics_port, path)[0] == 200, f"{path} did not answer on the metrics listener"
        for path in ["/api/v1/idv/verifications", "/api/verifications", "/admin/deliveries", "/webhooks/koraidv"]:
            assert http_get(metrics_port, path)[0] == 404, f"{path} answered on the metrics listener"
    finally:
        output = stop(sidecar)
    assert sidecar.returncode == 0, output


def test_image_environment_only_start_and_exec_read_the_same_store(sidecar_bin, tmp_path, http_server):
    """The image with no config.json mounted: `serve` (its CMD) and a later `deliveries list`, both
    without flags, in the image's working directory with the image's ENV, use one store."""
    if Path(SERVE_CONFIG).exists():
        pytest.skip(f"{SERVE_CONFIG} exists on this machine and would be read instead of the environment")
    workdir = tmp_path / "workdir"  # stands for WORKDIR /data: no config.json in it
    workdir.mkdir()
    store = tmp_path / "volume/kora-sidecar.sqlite"  # stands for the image's /data volume
    assert image_environment()["KORA_SIDECAR_SQLITE_PATH"] == "/data/kora-sidecar.sqlite"
    webhook_port, internal_port = free_port(), free_port()
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "KORA_SIDECAR_SQLITE_PATH": str(store),
        "KORAIDV_WEBHOOK_SECRET": "kora-webhook-secret",
        "KORA_SIDECAR_WEBHOOK_PORT": str(webhook_port),
        "KORA_SIDECAR_INTERNAL_PORT": str(internal_port),
        # The fixture's server has no POST handler (501): the delivery stays in the store, pending.
        "KORA_SIDECAR_FORWARD_URL": f"http://127.0.0.1:{http_server}/kora-events",
    }

    def command(*arguments):
        return subprocess.run([str(sidecar_bin), *arguments], cwd=workdir, env=environment,
                              capture_output=True, text=True, timeout=60)

    # Before serve ran: a read-only command does not create an empty store, it names the path.
    missing = command("deliveries", "list")
    assert missing.returncode == 1 and str(store) in missing.stderr, missing.stderr
    assert not store.exists()

    sidecar = subprocess.Popen([str(sidecar_bin), *image_command()], cwd=workdir, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: http_get(internal_port, "/readyz")[0] == 200, sidecar, "/readyz answers 200")
        sent = command("send-test-event", "--to", f"http://127.0.0.1:{webhook_port}/webhooks/koraidv",
                       "--secret", "kora-webhook-secret", "--external-id", "test-approve-exec")
        assert sent.returncode == 0 and sent.stdout.startswith("200"), sent.stdout + sent.stderr
        assert store.exists(), "serve did not put its store at KORA_SIDECAR_SQLITE_PATH"
        listed = command("deliveries", "list")  # what `docker exec <c> kora-sidecar deliveries list` runs
        assert listed.returncode == 0, listed.stderr
        (delivery,) = json.loads(listed.stdout)
        assert (delivery["service"], delivery["status"]) == ("app", "pending"), delivery
        assert delivery["eventType"] == "verification.completed", delivery
        assert not (workdir / "data").exists(), "a store was created in the working directory"
    finally:
        output = stop(sidecar)
    assert sidecar.returncode == 0, output


# ---------------------------------------------------------------------------------------------
# the documentation of deploy/

# What the metrics listener serves (buildMetricsRouter), checked against the binary above.
METRICS_LISTENER_PATHS = ["/metrics", "/healthz", "/readyz"]
OPERATIONS_DOC = ROOT / "docs/operations.md"


def deploy_texts():
    """(path, text) of every text file under deploy/, and of docs/operations.md."""
    paths = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return [(path, path.read_text(errors="replace")) for path in paths + [OPERATIONS_DOC]]


def test_descriptions_of_the_metrics_listener_name_every_path_it_serves():
    """A list of the metrics listener's paths (`/metrics` and `/healthz` ...) includes /readyz too."""
    found = 0
    for path, text in deploy_texts():
        for match in re.finditer(r"/metrics`?(?:,| and) `?(?:GET )?/healthz`?(?P<rest>[^.;)]*)", text):
            found += 1
            missing = [p for p in METRICS_LISTENER_PATHS if p not in match.group(0)]
            assert not missing, f"{path.relative_to(ROOT)}: {match.group(0)!r} leaves out {missing}"
    assert found >= 4, "the descriptions of the metrics listener were not found"


def grace_periods():
    """{where: seconds} of every stop time the deploy files set or recommend."""
    (deployment,) = replicas_objects()["Deployment"]
    dockerfile = DOCKERFILE.read_text()
    return {
        "compose stop_grace_period": seconds(compose_service("sidecar")["stop_grace_period"]),
        "statefulset terminationGracePeriodSeconds": kubernetes_workload()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        "replicas terminationGracePeriodSeconds": deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        "systemd TimeoutStopSec": seconds(systemd_value(SYSTEMD_UNIT, "TimeoutStopSec")),
        "Dockerfile docker stop -t": int(re.search(r"docker stop -t (\d+)", dockerfile).group(1)),
        "Dockerfile stop_grace_period": seconds(re.search(r"stop_grace_period: (\w+)", dockerfile).group(1)),
    }


def test_the_dockerfile_recommends_a_stop_time_above_the_shutdown_budget():
    periods = grace_periods()
    budget = shutdown_budget_seconds({})  # the image's defaults
    for where in ["Dockerfile docker stop -t", "Dockerfile stop_grace_period"]:
        assert periods[where] > budget, f"{where} {periods[where]} s: the drain plus a proxied call take {budget} s"


def test_the_operations_doc_gives_the_deploy_files_grace_period():
    periods = grace_periods()
    assert len(set(periods.values())) == 1, f"the deploy files disagree: {periods}"
    said = re.search(r"the deploy files use (\d+) s", OPERATIONS_DOC.read_text())
    assert said, "docs/operations.md no longer says what grace period the deploy files use"
    assert int(said.group(1)) == next(iter(periods.values())), f"docs/operations.md says {said.group(1)} s: {periods}"


def test_the_readme_says_which_sidecar_socket_is_0660():
    """deploy/README.md names exactly the listeners whose Unix socket the sources chmod to 0660."""
    restricted = set()
    for path in swift_sources():
        restricted |= set(re.findall(r"case \.unixSocket\(let path\) = configuration\.(\w+)\.listen \{ UnixSocketFile\.restrict",
                                     path.read_text()))
    assert restricted, "UnixSocketFile.restrict was not found under Sources/"
    (bullet,) = re.findall(r"^- \*\*Unix sockets and permissions\.\*\*(.*?)(?=^- )", (DEPLOY / "README.md").read_text(), re.M | re.S)
    (sidecar_sentence,) = [s for s in re.split(r"(?<=\.) ", " ".join(bullet.split())) if s.startswith("The sidecar ") and "0660" in s]
    named = set(re.findall(r"`(\w+)\.listen\.unixSocket`", sidecar_sentence))
    assert named == restricted, f"the README says 0660 for {named or 'all its sockets'}, the sources for {restricted}: {sidecar_sentence!r}"


def test_every_deploy_file_is_described_in_its_readme():
    """Each file under deploy/ has a row in deploy/README.md, or in monitoring/README.md for those."""
    for readme in [DEPLOY / "README.md", DEPLOY / "monitoring/README.md"]:
        text = readme.read_text()
        for path in sorted(p for p in readme.parent.rglob("*") if p.is_file() and p != readme):
            relative = path.relative_to(readme.parent).as_posix()
            if readme.parent == DEPLOY and relative.startswith("monitoring/"):
                continue
            if relative.startswith("compose/app/__pycache__"):
                continue
            assert f"`{relative}`" in text, f"{readme.relative_to(ROOT)} does not describe {relative}"


def test_deploy_files_link_nothing_outside_the_repository():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        text = path.read_text(errors="replace")
        assert "../shared" not in text and "SPEC.md" not in text and "KORA.md" not in text, path
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target):
                assert (path.parent / target).resolve().is_relative_to(ROOT), f"{path}: {target}"
                assert (path.parent / target).exists(), f"{path}: broken link {target}"
