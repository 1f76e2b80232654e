"""deploy/kubernetes/ renders with `kubectl kustomize`, and what it renders is the topology of
docs/deploy.md: gateway replicas probed on /api/health, the database and tokens from a Secret,
and host agents on GPU nodes only."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml
from conftest import REPO

KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path="/usr/bin")


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed here: the Kubernetes manifests are not rendered.")
    done = subprocess.run([KUBECTL, "kustomize", str(REPO / "deploy" / "kubernetes")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def secret_keys(container: dict[str, Any]) -> dict[str, str]:
    """Each environment variable taken from a Secret: its name, and "secret/key"."""
    keys = {}
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            keys[variable["name"]] = f"{ref['name']}/{ref['key']}"
    return keys


def test_gateway_replicas_behind_one_service_probed_on_health(rendered: Any) -> None:
    deployment = rendered[("Deployment", "gpupool-gateway")]
    assert deployment["metadata"]["namespace"] == "gpupool"
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["args"][:2] == ["gpupool", "gateway"]
    assert "--ip=0.0.0.0" in container["args"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/api/health", probe
    # A database blip takes replicas out of the Service long before it restarts them.
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert (ready["periodSeconds"] * ready["failureThreshold"]
            < live["periodSeconds"] * live["failureThreshold"])  # fmt: skip
    assert secret_keys(container) == {
        "GPUPOOL_DB_URL": "gpupool-secrets/db-url",
        "GPUPOOL_ADMIN_TOKEN": "gpupool-secrets/admin-token",
        "GPUPOOL_JOIN_TOKEN": "gpupool-secrets/join-token",
        "GPUPOOL_HOST_KEY": "gpupool-secrets/host-key",
        "GPUPOOL_METRICS_TOKEN": "gpupool-secrets/metrics-token",
    }
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    service = rendered[("Service", "gpupool-gateway")]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"].get("sessionAffinity", "None") == "None"  # no sticky sessions
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in ("http", 8765)


def test_host_agents_run_on_gpu_nodes_with_the_nvidia_runtime(rendered: Any) -> None:
    daemonset = rendered[("DaemonSet", "gpupool-host")]
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["runtimeClassName"] == "nvidia"
    [container] = spec["containers"]
    assert container["args"][:2] == ["gpupool", "host"]
    assert "--gateway=http://gpupool-gateway.gpupool.svc:8765" in container["args"]
    assert secret_keys(container) == {"GPUPOOL_JOIN_TOKEN": "gpupool-secrets/join-token"}
    # No secret is on a command line, where every user of the node can read it.
    for objects in rendered.values():
        for pod_spec in [objects.get("spec", {}).get("template", {}).get("spec", {})]:
            for c in pod_spec.get("containers", []):
                assert not any("token" in a or "db-url" in a for a in c.get("args", [])), c


def test_no_secret_values_are_shipped(rendered: Any) -> None:
    """The Secret is the operator's to make (docs/deploy.md): none is rendered with a value."""
    assert not [key for key in rendered if key[0] == "Secret"]
