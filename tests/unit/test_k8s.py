"""The Kubernetes manifests: every overlay renders with ``kubectl kustomize``, every object
validates against the Kubernetes schemas offline (``kubernetes-validate``, strict: unknown
fields are errors), and the cross-references hold: selectors match labels, named ports exist,
mounted ConfigMap keys and Secret keys are the files the gateway is told to read, env vars are
real ServerConfig fields, HPA metrics are published by the adapter rules.

Needs ``kubectl`` with kustomize v4 or newer (kubectl 1.21+); skips with the reason otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from clipserve.config import from_args
from clipserve.server.config import ServerConfig

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# Oldest and newest Kubernetes minor versions the manifests must validate against: 1.29 is the
# oldest still in the big clouds' extended support; gRPC probes need 1.27.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)  # Prometheus Operator kinds: checked by hand below
# Created out of band (README "## Deploy"), with the keys the gateway reads.
SECRETS = {"clipserve-gateway-tls": {"tls.crt", "tls.key", "ca.crt"},
           "clipserve-api-keys": {"api-keys"}}
CONFIG_ENV = {"CLIPSERVE_" + f.name.upper() for f in dataclasses.fields(ServerConfig)}


@functools.lru_cache(maxsize=None)
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays (needs 1.21+; "
                    "Debian bookworm's kubernetes-client is 1.20, too old)")
    out = subprocess.run([path, "version", "--client"], capture_output=True, text=True).stdout
    match = re.search(r"Kustomize Version: v(\d+)", out)
    if not match or int(match.group(1)) < 4:
        pytest.skip(f"kubectl's embedded kustomize is too old for k8s/ (need v4+, kubectl "
                    f"1.21+); `kubectl version --client` says: {out.strip()!r}")
    return path


@functools.lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def pods(docs):
    """(Deployment, pod template spec, pod labels) per Deployment."""
    for deployment in of_kind(docs, "Deployment"):
        template = deployment["spec"]["template"]
        yield deployment, template["spec"], template["metadata"]["labels"]


def container_ports(pod_spec: dict) -> dict:
    return {p["name"]: p["containerPort"] for c in pod_spec["containers"]
            for p in c.get("ports", [])}


def pods_selected(docs, selector: dict) -> list[dict]:
    return [spec for _, spec, labels in pods(docs) if matches(selector, labels)]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def gateway(docs) -> dict:
    return named(docs, "Deployment", "clipserve-gateway")


def gateway_container(docs) -> dict:
    (container,) = [c for c in gateway(docs)["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "gateway"]
    return container


# -- rendering and schemas ---------------------------------------------------------------------

def test_there_are_gpu_and_cpu_overlays():
    assert {"gpu", "cpu"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    docs = rendered(overlay)
    assert of_kind(docs, "Deployment") and of_kind(docs, "Service")
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay, version):
    checked, crds = 0, []
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            crds.append(doc["kind"])
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay} {doc['kind']}/{doc['metadata']['name']} on {version}: "
                        f"{exc.message} at {'/'.join(map(str, exc.path))}")
        checked += 1
    assert checked >= 8
    assert set(crds) <= {"PodMonitor", "ServiceMonitor", "PrometheusRule"}, crds


# -- cross-references ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_their_pods(overlay):
    docs = rendered(overlay)
    for deployment, _, labels in pods(docs):
        assert matches(deployment["spec"]["selector"], labels), deployment["metadata"]["name"]
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for doc in of_kind(docs, kind):
            selector = (doc["spec"].get("selector") if kind != "NetworkPolicy"
                        else doc["spec"]["podSelector"])
            assert pods_selected(docs, selector), f"{kind}/{doc['metadata']['name']} selects " \
                                                  "no pod"
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        named(docs, target["kind"], target["name"])
    for monitor in of_kind(docs, "PodMonitor"):
        selected = pods_selected(docs, monitor["spec"]["selector"])
        assert selected, monitor["metadata"]["name"]
        ports = set().union(*(container_ports(spec) for spec in selected))
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, endpoint


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_line_up(overlay):
    docs = rendered(overlay)
    for service in of_kind(docs, "Service"):
        for spec in pods_selected(docs, service["spec"]["selector"]):
            ports = container_ports(spec)
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in ports.values(), \
                    f"Service/{service['metadata']['name']} port {port['name']} -> {target}"
    for policy in of_kind(docs, "NetworkPolicy"):
        own = set().union(*(container_ports(s).items() for s in
                            pods_selected(docs, policy["spec"]["podSelector"])))
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert any(port["port"] in pair for pair in own), (policy["metadata"], port)
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "namespaceSelector" in peer:
                    continue  # DNS in kube-system
                targets = pods_selected(docs, peer["podSelector"])
                if not targets:
                    assert overlay == "cpu", f"egress to no pod in {overlay}"
                    continue
                values = set().union(*(container_ports(s).values() for s in targets))
                for port in rule.get("ports", []):
                    assert port["port"] in values, (policy["metadata"]["name"], port)

    container = gateway_container(docs)
    env, ports = env_of(container), container_ports(gateway(docs)["spec"]["template"]["spec"])
    assert int(env["CLIPSERVE_PORT"]) == ports["grpc"]
    assert int(env["CLIPSERVE_METRICS_PORT"]) == ports["metrics"]
    assert int(env["CLIPSERVE_HEALTH_PORT"]) == ports["grpc-health"]
    assert int(env["CLIPSERVE_HTTP_PORT"]) == ports["http"]  # the OpenAI-compatible API
    if "CLIPSERVE_TRITON_METRICS_PORT" in env:  # tritonserver in the pod
        assert int(env["CLIPSERVE_TRITON_METRICS_PORT"]) == ports["triton-metrics"]
    # kubelet's gRPC probe cannot do TLS: it must use the plaintext health port.
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc-health"]
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["tcpSocket"]["port"] == "grpc-health"


def test_cpu_overlay_child_triton_metrics_are_scrapable_at_the_pod_ip():
    """The PodMonitor scrapes port triton-metrics at the pod IP: in the cpu overlay the gateway
    starts Triton itself, so the child's metrics must bind every interface (its gRPC/HTTP stay
    on loopback: TritonProcess has no setting for them)."""
    docs = rendered("cpu")
    config = from_args(ServerConfig, argparse.Namespace(), environ=env_of(gateway_container(docs)))
    assert config.triton_url == ""  # the child
    assert config.triton_metrics_address == "0.0.0.0"
    ports = container_ports(gateway(docs)["spec"]["template"]["spec"])
    assert config.triton_metrics_port == ports["triton-metrics"]
    monitor = yaml.safe_load((K8S / "monitoring" / "pod-monitor.yaml").read_text())
    assert "triton-metrics" in {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_env_names_real_config_fields_and_files_it_mounts(overlay):
    docs = rendered(overlay)
    container = gateway_container(docs)
    spec = gateway(docs)["spec"]["template"]["spec"]
    env = env_of(container)
    assert set(env) <= CONFIG_ENV, sorted(set(env) - CONFIG_ENV)
    # Parsed as `clipserve serve` will: every value converts and they are valid together.
    config = from_args(ServerConfig, argparse.Namespace(), environ=env)
    assert config.tls_cert_file is not None and config.api_keys_file is not None
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}

    def source_of(path: str) -> tuple[dict, str]:
        folder, _, key = path.rpartition("/")
        assert folder in mounts, f"{path}: {folder} is not mounted"
        return mounts[folder], key

    volume, key = source_of(env["CLIPSERVE_ROUTING_FILE"])
    configmap = named(docs, "ConfigMap", volume["configMap"]["name"])
    assert key in configmap["data"]
    assert re.fullmatch(r'\{"weights": \{.+\}\}\s*', configmap["data"][key])
    for variable in ("CLIPSERVE_TLS_CERT_FILE", "CLIPSERVE_TLS_KEY_FILE",
                     "CLIPSERVE_API_KEYS_FILE"):
        volume, key = source_of(env[variable])
        secret = volume["secret"]["secretName"]
        assert key in SECRETS[secret], (variable, secret, key)
        assert not volume["secret"].get("optional"), "a missing key or cert must stop the pod"
    referenced = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert referenced == set(SECRETS)
    assert not of_kind(docs, "Secret"), "Secrets are created out of band, never committed"
    readme = (ROOT / "README.md").read_text()
    assert all(name in readme for name in SECRETS), "README must say how to create the Secrets"
    # The drain fits in the grace period: preStop sleep + shutdown_grace_s.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + float(env["CLIPSERVE_SHUTDOWN_GRACE_S"]) < \
        spec["terminationGracePeriodSeconds"]


def test_gpu_overlay_runs_triton_on_gpus_behind_the_gateway():
    docs = rendered("gpu")
    triton = named(docs, "Deployment", "clipserve-triton")["spec"]["template"]["spec"]
    (container,) = triton["containers"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--strict-readiness=true" in container["args"]
    assert any(t["key"] == "nvidia.com/gpu" for t in triton["tolerations"])

    url = env_of(gateway_container(docs))["CLIPSERVE_TRITON_URL"]
    host, port = url.split(":")
    service = named(docs, "Service", host)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert container_ports(triton)[service_port["targetPort"]] == int(
        re.search(r"--grpc-port=(\d+)", " ".join(container["args"])).group(1))
    # Only the gateway may call Triton's gRPC port.
    policy = named(docs, "NetworkPolicy", "clipserve-triton")
    grpc_rules = [r for r in policy["spec"]["ingress"]
                  if any(p["port"] == service_port["targetPort"] for p in r["ports"])]
    assert [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for rule in grpc_rules for peer in rule["from"]] == ["gateway"]


def test_cpu_overlay_runs_the_whole_stack_in_the_gateway_pod():
    docs = rendered("cpu")
    assert [d["metadata"]["name"] for d in of_kind(docs, "Deployment")] == ["clipserve-gateway"]
    container = gateway_container(docs)
    assert "CLIPSERVE_TRITON_URL" not in env_of(container)
    assert container["image"].endswith("-cpu")
    assert "/dev/shm" in {m["mountPath"] for m in container["volumeMounts"]}
    # The same port names as the GPU overlay's pods, so k8s/monitoring scrapes both.
    assert {"grpc", "grpc-health", "metrics", "triton-metrics"} <= set(
        container_ports(gateway(docs)["spec"]["template"]["spec"]))
    assert not any(d["apiVersion"].startswith(CRD_GROUPS) for d in docs), \
        "the CPU overlay must run on a cluster without the Prometheus Operator"
    spec = gateway(docs)["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert "--exclude" not in " ".join(init["command"] + init.get("args", [])), \
        "tritonserver in the pod needs the ONNX files"


def test_cpu_openvino_overlay_runs_nvidias_openvino_backend_on_cpu_nodes():
    """NVIDIA's Triton image (it ships backends/openvino) on CPU nodes behind the gateway, over
    a repository whose configs `clipserve export --backend openvino` writes."""
    from clipserve.endpoints import Precision, Sidecar, Tower
    from clipserve.export import repository

    docs = rendered("cpu-openvino")
    triton = named(docs, "Deployment", "clipserve-triton")["spec"]["template"]["spec"]
    (container,) = triton["containers"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert container["image"].endswith("-py3"), "the -py3 images are the ones with openvino"
    assert "nodeSelector" not in triton and "tolerations" not in triton
    for bound in ("requests", "limits"):
        assert not any("gpu" in key for key in container["resources"][bound]), bound
    assert "--allow-gpu-metrics=false" in container["args"]
    assert "--disable-auto-complete-config" in container["args"]  # the export writes it all
    url = env_of(gateway_container(docs))["CLIPSERVE_TRITON_URL"]
    host, port = url.split(":")
    assert host == "clipserve-triton" and int(port) == container_ports(triton)["grpc"]
    assert "--grpc-port=" + port in container["args"]
    (init,) = triton["initContainers"]
    assert init["image"].split(":")[-1].endswith("openvino")
    sidecar = Sidecar(scale="s", precision="fp32", tower="image", embed_dim=4, source="x",
                      image_size=8)
    config = repository.config_pbtxt("s_fp32_image", Tower.IMAGE, sidecar, "openvino",
                                     Precision.FP32)
    assert 'backend: "openvino"' in config and 'default_model_filename: "model.onnx"' in config
    assert "clipserve export --backend openvino" in (
        K8S / "overlays" / "cpu-openvino" / "kustomization.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_metrics_are_published_by_the_adapter_rules(overlay):
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())
    published = {rule["name"]["as"] for rule in rules["rules"]["custom"]}
    for hpa in of_kind(rendered(overlay), "HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in published, metric
            else:
                assert metric["type"] == "Resource"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_and_bounded(overlay):
    for deployment, spec, _ in pods(rendered(overlay)):
        name = deployment["metadata"]["name"]
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] and pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), \
                    (name, container["name"], bound)
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
