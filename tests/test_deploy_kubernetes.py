"""Static checks of the Kubernetes manifests under deploy/kubernetes/ (no cluster runs here).

A schema validator such as kubeconform is neither on PyPI nor in Debian, so the manifests are
loaded with PyYAML and checked for what running nzgw on Kubernetes relies on: the image, the
probes on /healthz and /readyz, ports that match the configuration, every environment name an
nzgw setting, secrets only by reference, an unprivileged read-only container, a grace period
longer than the drain, Service, NetworkPolicy and PodDisruptionBudget selecting the gateway's
pods, and no unknown field names (a misspelt `readynessProbe` would otherwise be dropped by the
API server without a word). When `kubectl` happens to be installed, `kubectl kustomize` must
also render the kustomization (offline); it is not installed for this test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from nzgw.config import SETTINGS, config_from_values

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
SETTING_NAMES = {s.env for s in SETTINGS}
SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "OLLAMA_AUTH_TOKEN"}
SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|DATABASE_URL|REDIS_URL|OLLAMA_BACKENDS", re.I)
GATEWAY_LABELS = {"app.kubernetes.io/name": "nzgw", "app.kubernetes.io/component": "gateway"}

API_VERSIONS = {
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "PersistentVolumeClaim": "v1",
}
# Field names of the Kubernetes API objects used here (core/v1 PodSpec, Container, Probe...):
# a typo is an unknown name.
POD_SPEC_FIELDS = {
    "automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds",
    "securityContext", "topologySpreadConstraints", "containers", "volumes", "restartPolicy",
    "serviceAccountName", "nodeSelector", "affinity", "tolerations", "priorityClassName",
    "initContainers", "imagePullSecrets",
}  # fmt: skip
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "ports", "env", "envFrom",
    "resources", "securityContext", "volumeMounts", "startupProbe", "livenessProbe",
    "readinessProbe", "lifecycle", "workingDir", "terminationMessagePolicy",
}  # fmt: skip
PROBE_FIELDS = {
    "httpGet", "exec", "tcpSocket", "grpc", "initialDelaySeconds", "periodSeconds",
    "timeoutSeconds", "failureThreshold", "successThreshold", "terminationGracePeriodSeconds",
}  # fmt: skip
CONTAINER_SECURITY_FIELDS = {
    "allowPrivilegeEscalation", "readOnlyRootFilesystem", "privileged", "capabilities",
    "runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile",
}  # fmt: skip
POD_SECURITY_FIELDS = {
    "runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile", "supplementalGroups",
}  # fmt: skip


def documents() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/kubernetes, by `Kind/name`."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


DOCS = documents()
DEPLOYMENT = DOCS["Deployment/nzgw"]
POD = DEPLOYMENT["spec"]["template"]
(GATEWAY,) = POD["spec"]["containers"]
CONFIG: dict[str, str] = DOCS["ConfigMap/nzgw-config"]["data"]
JOB = DOCS["Job/nzgw-migrate"]


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def dockerfile_user() -> tuple[int, int]:
    (user,) = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    return int(user[0]), int(user[1])


def port_of(bind: str) -> int:
    return int(bind.rpartition(":")[2])


def test_the_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The migration Job is the optional supervised step, applied by hand (its header says how).
    assert listed == files - {"migrate-job.yaml"}
    assert set(DOCS) == {
        "ConfigMap/nzgw-config",
        "Deployment/nzgw",
        "Job/nzgw-migrate",
        "Service/nzgw",
        "NetworkPolicy/nzgw",
        "PodDisruptionBudget/nzgw",
        "PersistentVolumeClaim/nzgw-spool",
    }
    for name, doc in DOCS.items():
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], name
        assert "namespace" not in doc["metadata"], name  # the operator chooses it


def test_the_spool_directory_is_on_the_shared_persistent_volume() -> None:
    """Rows spooled while PostgreSQL is away must outlive the pod: NZGW_SPOOL_DIR is the mount
    of a ReadWriteMany claim, so the next replica to start replays them."""
    (mount,) = [m for m in GATEWAY["volumeMounts"] if m["mountPath"] == CONFIG["NZGW_SPOOL_DIR"]]
    (volume,) = [v for v in POD["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = DOCS[f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_no_unknown_field_names() -> None:
    for owner, pod in (("Deployment", POD["spec"]), ("Job", JOB["spec"]["template"]["spec"])):
        assert set(pod) <= POD_SPEC_FIELDS, (owner, set(pod) - POD_SPEC_FIELDS)
        assert set(pod["securityContext"]) <= POD_SECURITY_FIELDS, owner
        for container in pod["containers"]:
            assert set(container) <= CONTAINER_FIELDS, (owner, set(container) - CONTAINER_FIELDS)
            assert set(container["securityContext"]) <= CONTAINER_SECURITY_FIELDS, owner
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container:
                    assert set(container[kind]) <= PROBE_FIELDS, (owner, kind)


def test_the_image_is_the_projects_pinned_build() -> None:
    expected = f"nzgw:{project_version()}"
    assert GATEWAY["image"] == expected
    assert JOB["spec"]["template"]["spec"]["containers"][0]["image"] == expected
    assert GATEWAY["args"] == ["nzgw", "serve"]
    assert JOB["spec"]["template"]["spec"]["containers"][0]["args"] == ["nzgw", "migrate"]


def test_probes_use_healthz_for_liveness_and_readyz_for_readiness() -> None:
    def target(probe: str) -> tuple[str, str]:
        get = GATEWAY[probe]["httpGet"]
        return get["path"], get["port"]

    assert target("livenessProbe") == ("/healthz", "http")
    assert target("startupProbe") == ("/healthz", "http")
    assert target("readinessProbe") == ("/readyz", "http")
    # A slow store or backend makes a pod unready, never killed: liveness is not /readyz.
    assert GATEWAY["livenessProbe"]["timeoutSeconds"] < GATEWAY["livenessProbe"]["periodSeconds"]


def test_ports_match_the_configuration() -> None:
    ports = {p["name"]: p["containerPort"] for p in GATEWAY["ports"]}
    assert ports == {
        "http": port_of(CONFIG["NZGW_BIND"]),
        "metrics": port_of(CONFIG["NZGW_METRICS_BIND"]),
    }
    assert CONFIG["NZGW_BIND"].startswith("0.0.0.0:")  # reachable from the Service
    # Worker i serves metrics on port + i: one worker per pod, one metrics port.
    assert CONFIG["NZGW_WORKERS"] == "1"
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_every_environment_name_is_a_setting_and_secrets_are_references() -> None:
    assert set(CONFIG) <= SETTING_NAMES, set(CONFIG) - SETTING_NAMES
    assert not {k for k in CONFIG if SECRETISH.search(k)}  # no secret in the ConfigMap
    for value in CONFIG.values():
        assert "@" not in value  # no credentials in a URL
    for container in (GATEWAY, JOB["spec"]["template"]["spec"]["containers"][0]):
        refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
        assert refs == ["nzgw-config"]
        for entry in container["env"]:
            assert entry["name"] in SETTING_NAMES, entry["name"]
            assert "value" not in entry, entry["name"]  # nothing inline
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "nzgw-secrets" and ref["key"] == entry["name"]
    assert {e["name"] for e in GATEWAY["env"]} == SECRET_KEYS
    optional = {e["name"] for e in GATEWAY["env"] if e["valueFrom"]["secretKeyRef"].get("optional")}
    assert optional == {"OLLAMA_AUTH_TOKEN"}  # the gateway needs both stores
    assert not any(doc["kind"] == "Secret" for doc in DOCS.values())


def test_the_environment_is_a_valid_shared_store_configuration() -> None:
    values = {
        **CONFIG,
        "DATABASE_URL": "postgresql://nzgw:pw@postgres:5432/nzgw",
        "REDIS_URL": "redis://:pw@redis:6379/0",
    }
    config = config_from_values(values)
    assert not config.embedded_counters and config.database_url.startswith("postgresql://")
    assert config.log_format == "json"
    # The kubelet's SIGKILL comes after the preStop pause and the whole drain, not during it.
    pre_stop = GATEWAY["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(re.findall(r"sleep\((\d+(?:\.\d+)?)\)", pre_stop[-1])[0])
    grace = POD["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pause + config.graceful_timeout + 5


def test_the_container_is_unprivileged_with_a_read_only_root() -> None:
    uid, gid = dockerfile_user()
    for spec in (POD["spec"], JOB["spec"]["template"]["spec"]):
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (uid, gid)
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["privileged"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            # /tmp is the one writable path (an in-memory emptyDir), and the gateway's spool.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            spool = {"/app/var/spool": "spool"} if spec is POD["spec"] else {}
            assert mounts == {"/tmp": "tmp", **spool}
            assert container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert set(volumes) == {"tmp", *spool.values()}
        assert volumes["tmp"]["emptyDir"]["medium"] == "Memory"
    assert GATEWAY["resources"]["requests"]["cpu"]


def test_service_policy_and_budget_select_the_gateway_pods() -> None:
    labels = POD["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert labels.items() >= GATEWAY_LABELS.items()
    service = DOCS["Service/nzgw"]["spec"]
    assert service["selector"] == GATEWAY_LABELS
    # The public Service carries the gateway port only, never /metrics.
    assert [(p["name"], p["targetPort"]) for p in service["ports"]] == [("http", "http")]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    policy = DOCS["NetworkPolicy/nzgw"]["spec"]
    assert policy["podSelector"]["matchLabels"] == GATEWAY_LABELS
    rules = {r["ports"][0]["port"]: r for r in policy["ingress"]}
    assert set(rules) == {"http", "metrics"}
    assert "from" in rules["metrics"]  # metrics only from the monitoring namespaces
    budget = DOCS["PodDisruptionBudget/nzgw"]["spec"]
    assert budget["selector"]["matchLabels"] == GATEWAY_LABELS
    assert budget["minAvailable"] < DEPLOYMENT["spec"]["replicas"]
    assert DEPLOYMENT["spec"]["replicas"] >= 2  # replicas share PostgreSQL and Redis
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_kubectl_renders_the_kustomization(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional: the checks above do not need it)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no kubeconfig: never a cluster
    )
    assert result.returncode == 0, result.stderr
    rendered = {f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(result.stdout)}
    assert rendered == set(DOCS) - {"Job/nzgw-migrate"}
