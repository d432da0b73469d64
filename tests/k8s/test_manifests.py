"""k8s/: every overlay renders with kustomize, every object validates against the Kubernetes
API schemas (kubernetes-validate) or its project's CRD, the ConfigMap lists every setting of
the README with its default, every variable the pods get is one tm knows and parses
(`tm check --config-only`), and the arithmetic of the sizing holds: workers per pod, partitions,
KEDA's maximum, the grace period and the session timeout (docs/kubernetes.md).

No cluster, no network after stack/k8s.sh has run once (`make test` runs it first).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s.conftest import (
    K8S,
    OVERLAYS,
    ROOT,
    Obj,
    container_env,
    one,
    quantity,
    secret_data,
    tm_config,
)
from tm import config

# Kubernetes releases validated against: an older one still supported by the big providers,
# and the newest kubernetes-validate bundles.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
SECRET_KEYS = {
    "POSTGRES_PASSWORD",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_KEY_PASSWORD",
    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
    "API_TOKEN",
    "REDIS_URL",  # redis://user:password@host...
}
# Set by the StatefulSet itself (downward API / its volumes), so in neither ConfigMap nor Secret.
POD_KEYS = {"KAFKA_GROUP_INSTANCE_ID", "PROMETHEUS_MULTIPROC_DIR"}
# Measured RSS (docs/kubernetes.md: `tm run` with TM_WORKERS=1 and 2, 20,000 and
# 100,000 tasks): supervisor + API process, and the high-water mark of one worker.
FIXED_MIB, PER_WORKER_MIB = 39 + 55, 115
# A pod's restart besides the drain: the new pod scheduled, its init container, tm's start.
RESTART_MARGIN_MS = 60_000
CUSTOM = {"ScaledObject", "PodMonitor", "PrometheusRule"}
DASHBOARD = K8S / "components" / "monitoring" / "tm-dashboard.json"
CRD_FILES = {
    "ScaledObject": "config/crd/bases/keda.sh_scaledobjects.yaml",
    "PodMonitor": "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
}


# -- helpers ----------------------------------------------------------------------------------


def readme_settings() -> dict[str, str]:
    """README "Configuration": each variable and its default (empty: unset or computed)."""
    section = (ROOT / "README.md").read_text().split("\n## Configuration\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    settings: dict[str, str] = {}
    for line in section.splitlines():
        row = re.match(r"^\| (`[A-Z0-9_]+`(?:, `[A-Z0-9_]+`)*) \| ([^|]*) \|", line)
        if row:
            default = re.fullmatch(r"`([^`]*)`", row[2].strip())
            for name in re.findall(r"`([A-Z0-9_]+)`", row[1]):
                settings[name] = default[1] if default else ""
    return settings


def config_names() -> set[str]:
    """Every variable tm/config.py's load() reads (it reads them all, set or not)."""
    seen: set[str] = set()

    class Recorder(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            seen.add(key)
            return super().get(key, default)

    config.load(Recorder())
    return seen


def defaults_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (K8S / "base/config/defaults.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def statefulset(objects: list[Obj]) -> Obj:
    return one(objects, "StatefulSet", "tm")


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = statefulset(objects)["spec"]["template"]["spec"]
    return spec


def tm_container(objects: list[Obj]) -> Obj:
    return next(c for c in pod_spec(objects)["containers"] if c["name"] == "tm")


def with_secret(objects: list[Obj]) -> list[Obj]:
    """prod renders no Secret (the operator creates tm-secrets): use the example's keys."""
    if any(o["kind"] == "Secret" for o in objects):
        return objects
    example = yaml.safe_load((K8S / "components/example-secret/secret.yaml").read_text())
    return [*objects, example]


def settings_of(objects: list[Obj]) -> dict[str, str]:
    """The tm container's environment, as the kubelet would give it."""
    objects = with_secret(objects)
    return container_env(objects, pod_spec(objects), tm_container(objects))


def workers_per_pod(objects: list[Obj]) -> int:
    """TM_WORKERS when set, else what tm takes by default: the CPU limit, rounded up."""
    env = settings_of(objects)
    if env.get("TM_WORKERS"):
        return int(env["TM_WORKERS"])
    return int(-(-quantity(tm_container(objects)["resources"]["limits"]["cpu"]) // 1))


def pod_template(obj: Obj) -> Obj:
    """The pod template of a StatefulSet, a Job or a CronJob."""
    spec = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    template: Obj = spec["template"]
    return template


def every_container(objects: list[Obj]) -> list[tuple[str, Obj, Obj]]:
    """(where, pod spec, container) of every pod template: the StatefulSet's, the Job's and
    the CronJob's."""
    out = []
    for obj in objects:
        if obj["kind"] in ("StatefulSet", "Job", "CronJob"):
            spec = pod_template(obj)["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                out.append((f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", spec, c))
    return out


def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`tm check --config-only` with exactly ``env`` (and only PATH from outside)."""
    return subprocess.run(
        [sys.executable, "-m", "tm", "check", "--config-only"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def strict(schema: Any) -> Any:
    """A CRD's structural schema that refuses unknown fields, as `kubectl apply` with strict
    field validation does (the API server would otherwise drop them silently)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


# -- rendering and schemas ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_objects_it_should(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    kinds = sorted(o["kind"] for o in rendered[overlay])
    base = [
        "ConfigMap",
        "CronJob",
        "Job",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    expected = {
        "dev": [*base, "Namespace", "Secret", "Secret"],  # tm-secrets, tm-tls (examples)
        "prod": [
            *base,
            *("ConfigMap", "Namespace", "PodMonitor", "PrometheusRule", "ScaledObject"),
        ],  # the ConfigMap: the Grafana dashboard
        "test": [*base, "Secret", "Secret"],
    }[overlay]
    assert kinds == sorted(expected)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[Obj]], overlay: str, version: str
) -> None:
    for obj in rendered[overlay]:
        if obj["kind"] in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {exc.message}")


def test_custom_resources_validate_against_their_crds(
    rendered: dict[str, list[Obj]], crd_modules: list[Path]
) -> None:
    schemas: dict[tuple[str, str], Any] = {}
    for kind, relative in CRD_FILES.items():
        path = next(m / relative for m in crd_modules if (m / relative).is_file())
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["names"]["kind"] == kind
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api_version, kind)] = strict(version["schema"]["openAPIV3Schema"])
    checked = 0
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] not in CUSTOM:
                continue
            schema = schemas.get((obj["apiVersion"], obj["kind"]))
            assert schema is not None, f"{overlay}: no served CRD version {obj['apiVersion']}"
            errors = sorted(
                jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: e.json_path
            )
            assert not errors, f"{overlay} {obj['kind']}: " + "; ".join(
                f"{e.json_path}: {e.message}" for e in errors
            )
            checked += 1
    assert checked == 3  # prod's ScaledObject, PodMonitor and PrometheusRule


def test_crd_validation_refuses_an_unknown_field(
    rendered: dict[str, list[Obj]], crd_modules: list[Path]
) -> None:
    relative = CRD_FILES["ScaledObject"]
    path = next(m / relative for m in crd_modules if (m / relative).is_file())
    crd = yaml.safe_load(path.read_text())
    schema = strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    scaled = copy.deepcopy(one(rendered["prod"], "ScaledObject"))
    scaled["spec"]["maxReplicas"] = 6  # a typo of maxReplicaCount
    assert not jsonschema.Draft7Validator(schema).is_valid(scaled)


# -- settings --------------------------------------------------------------------------------


def test_configmap_holds_every_setting_of_the_readme_with_its_default() -> None:
    readme = readme_settings()
    defaults = defaults_env()
    # The README table, tm/config.py and the manifests' sources name the same variables.
    assert set(readme) == config_names()
    assert set(defaults) | SECRET_KEYS | POD_KEYS == set(readme)
    assert not set(defaults) & (SECRET_KEYS | POD_KEYS)
    wrong = {k: (v, readme[k]) for k, v in defaults.items() if v != readme[k]}
    assert not wrong, f"defaults.env differs from the README's defaults: {wrong}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_secret_and_pod_env_do_not_overlap(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    data = tm_config(objects)["data"]
    assert set(data) == set(defaults_env()), "an overlay added or dropped a ConfigMap key"
    secrets = [
        o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "tm-secrets"
    ]
    for secret in secrets:
        assert set(secret_data(secret)) == SECRET_KEYS
    # A literal env entry would silently override the ConfigMap or Secret key of that name.
    literal = {v["name"] for v in tm_container(objects).get("env", [])}
    assert literal == POD_KEYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_the_pods_get_is_known_and_parses(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = with_secret(rendered[overlay])
    known = config_names()
    for where, spec, container in every_container(objects):
        env = container_env(objects, spec, container)
        assert not set(env) - known, f"{where}: variables tm does not know: {set(env) - known}"
        done = check_config(env)
        assert done.returncode == 0, f"{where}: {done.stderr}"
        assert done.stdout.startswith("settings: ok: ") and done.stdout.count("\n") == 1
        assert env["API_TOKEN"] not in done.stdout
    # The instance id is the pod's name: tm-0's workers are static members tm-0-0, tm-0-1, ...
    assert settings_of(objects)["KAFKA_GROUP_INSTANCE_ID"] == "tm-0"


def test_config_only_exits_2_naming_a_bad_setting(rendered: dict[str, list[Obj]]) -> None:
    env = settings_of(rendered["test"])
    done = check_config({**env, "KAFKA_SESSION_TIMEOUT": "2 minutes"})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "tm: KAFKA_SESSION_TIMEOUT='2 minutes' is invalid: expected an integer in 1000..3600000"
    ]


# -- the StatefulSet -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_statefulset_pods_have_static_ids_probes_drain_time_lockdown_and_node_spread(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    sts = statefulset(objects)
    spec = pod_spec(objects)
    tm = tm_container(objects)
    env = settings_of(objects)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert "replicas" not in sts["spec"]  # KEDA or `kubectl scale` owns it
    assert tm["args"] == ["run"]
    # Static membership: the instance id comes from the pod's stable name.
    instance = next(v for v in tm["env"] if v["name"] == "KAFKA_GROUP_INSTANCE_ID")
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Probes.
    assert tm["livenessProbe"]["httpGet"]["path"] == "/api/health/live"
    assert tm["readinessProbe"]["httpGet"]["path"] == "/api/health/ready"
    assert tm["startupProbe"]["httpGet"]["path"] == "/api/health/live"
    startup = tm["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > 60  # the pre-flight's 60 s
    port = next(p for p in tm["ports"] if p["name"] == "http")
    assert str(port["containerPort"]) == env["APP_PORT"]
    # Drain, then exit before the kubelet's SIGKILL.
    grace_ms = spec["terminationGracePeriodSeconds"] * 1000
    assert grace_ms > int(env["GRACEFUL_SHUTDOWN_TIMEOUT"]) + 5000
    # A restarted pod's static members are back before the session times out.
    assert int(env["KAFKA_SESSION_TIMEOUT"]) >= grace_ms + RESTART_MARGIN_MS
    # Security context, on the pod and on every container.
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for where, _, container in every_container(objects):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["runAsUser"] == 10001, where
    # Writable places on a read-only root: emptyDirs at /tmp and the metrics directory.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in tm["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]]
    # Spread over nodes.
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for constraint in spec["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_follow_the_cpu_limit_and_memory_fits_them(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    tm = tm_container(objects)
    env = settings_of(objects)
    assert env["TM_WORKERS"] == "", "TM_WORKERS is left to tm: the CPU quota (README)"
    limits = tm["resources"]["limits"]
    cpu = quantity(limits["cpu"])
    assert cpu == int(cpu), "a fractional CPU limit would round up to a worker it cannot feed"
    workers = workers_per_pod(objects)
    need = (FIXED_MIB + PER_WORKER_MIB * workers) * 2**20
    assert quantity(limits["memory"]) >= need, f"{workers} worker(s) need {need / 2**20} MiB"
    assert quantity(tm["resources"]["requests"]["memory"]) <= quantity(limits["memory"])
    # The consumer never has more workers than the partitions tm creates.
    assert workers <= int(env["TM_TOPIC_PARTITIONS"])


def test_prod_runs_two_workers_per_pod_within_the_memory_budget(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["prod"]
    assert workers_per_pod(objects) == 2
    assert quantity(tm_container(objects)["resources"]["limits"]["memory"]) <= 512 * 2**20


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_runs_before_tm(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    job = one(objects, "Job", "tm-migrate")
    job_container = job["spec"]["template"]["spec"]["containers"][0]
    init = pod_spec(objects)["initContainers"]
    assert [c["args"] for c in init] == [["db", "migrate"]]
    assert job_container["args"] == ["db", "migrate"]
    tm = tm_container(objects)
    assert job_container["image"] == init[0]["image"] == tm["image"]
    assert job_container["envFrom"] == init[0]["envFrom"] == tm["envFrom"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # so the next image's Job can be created


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prune_runs_hourly_one_at_a_time_as_the_migration_runs(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = with_secret(rendered[overlay])
    cron = one(objects, "CronJob", "tm-prune")
    job = one(objects, "Job", "tm-migrate")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, *_ = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour == "*"  # hourly
    spec, migrate = pod_template(cron)["spec"], job["spec"]["template"]["spec"]
    (prune,) = spec["containers"]
    assert prune["args"] == ["db", "prune"]
    # The migration Job's pod with another command: image, env, volumes, lockdown, resources.
    for key in ("image", "envFrom", "securityContext", "volumeMounts", "resources"):
        assert prune[key] == migrate["containers"][0][key], key
    for key in ("securityContext", "volumes", "automountServiceAccountToken"):
        assert spec[key] == migrate[key], key
    # A run stopped by its deadline gets SIGTERM and the grace period to record what it did.
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600
    env = container_env(objects, spec, prune)
    assert env.get("TM_RETENTION_DAYS", "") == ("30" if overlay == "prod" else "")
    labels = pod_template(cron)["metadata"]["labels"]
    policy = one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    assert policy.items() <= labels.items()  # reaches PostgreSQL
    for service in (o for o in objects if o["kind"] == "Service"):
        assert not service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_network_policy_select_the_pods(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    labels = statefulset(objects)["spec"]["template"]["metadata"]["labels"]
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    app_port = int(settings_of(objects)["APP_PORT"])
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert not service["spec"]["selector"].items() <= job_labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    policy = one(objects, "NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"].items()
    assert selector <= labels.items() and selector <= job_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [app_port]
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    env = settings_of(objects)
    brokers = {int(b.rsplit(":", 1)[1]) for b in env["KAFKA_BROKERS"].split(",")}
    otlp = int(re.search(r":(\d+)$", env["OTEL_EXPORTER_OTLP_ENDPOINT"])[1])  # type: ignore[index]
    assert brokers | {int(env["POSTGRES_PORT"]), otlp, 53} <= egress


# -- Prometheus and KEDA (prod) --------------------------------------------------------------


def test_prometheusrule_is_tm_alerts_yaml(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    rules = yaml.safe_load((K8S / "prometheus/tm-alerts.yaml").read_text())
    rule = one(rendered["prod"], "PrometheusRule")
    assert rule["spec"] == {"groups": rules["groups"]}
    # And the committed file is what the generator writes now (`make k8s-rules`).
    out = tmp_path / "prometheusrule.yaml"
    subprocess.run(["bash", str(K8S / "prometheus/prometheusrule.sh"), str(out)], check=True)
    committed = K8S / "components/monitoring/prometheusrule.yaml"
    assert out.read_text() == committed.read_text(), "run `make k8s-rules`"


def test_podmonitor_scrapes_every_tm_pod_as_job_tm(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["prod"]
    monitor = one(objects, "PodMonitor")["spec"]
    labels = statefulset(objects)["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    metrics, counts = monitor["podMetricsEndpoints"]
    ports = {p["name"] for p in tm_container(objects)["ports"]}
    assert (metrics["path"], counts["path"]) == ("/metrics", "/api/metrics")
    for endpoint in (metrics, counts):
        assert endpoint["port"] in ports
        relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
        assert relabel["job"]["replacement"] == "tm"  # the alert rules' job="tm"
        assert relabel["instance"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
    # The task counts' target is told apart (TmNotReady reads the /metrics one's `up`).
    assert {r["targetLabel"]: r.get("replacement") for r in counts["relabelings"]}["scrape"]
    assert "scrape" not in {r["targetLabel"] for r in metrics["relabelings"]}


def test_the_dashboard_ships_as_a_configmap_for_the_grafana_sidecar(
    rendered: dict[str, list[Obj]],
) -> None:
    shipped = one(rendered["prod"], "ConfigMap", "tm-dashboard")
    assert shipped["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert shipped["data"] == {"tm-dashboard.json": DASHBOARD.read_text()}


def test_keda_never_scales_past_partitions_per_worker(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["prod"]
    scaled = one(objects, "ScaledObject")["spec"]
    env = settings_of(objects)
    partitions = int(env["TM_TOPIC_PARTITIONS"])
    workers = workers_per_pod(objects)
    target = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "tm"}
    assert scaled["scaleTargetRef"] == target
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= partitions // workers, (
        f"{scaled['maxReplicaCount']} pods x {workers} workers > {partitions} partitions"
    )
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == env["KAFKA_BROKERS"]
    assert meta["consumerGroup"] == env["KAFKA_GROUP_ID"]
    assert meta["topic"] == env["TASK_STATUS_TOPIC"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["offsetResetPolicy"] == "earliest"
    assert meta["allowIdleConsumers"] == "false"
