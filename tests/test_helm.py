"""The Helm chart in deploy/helm/llm-sidecar: lint, render, validate, and what it renders means.

Every values file in the chart's ``ci/`` is linted (also ``--strict``) and
rendered; every rendered object is checked against the Kubernetes OpenAPI
schemas that ``kubernetes-validate`` ships (strict: an unknown field fails),
for Kubernetes 1.28 and 1.30 (and the version a file renders for). cert-manager
objects are custom resources those schemas do not have, so they get a
structural check of the fields the chart sets instead.

The rendered ``config.yaml`` goes through the sidecar's own loader
(``proxy.config.load_config``) with the environment the webhook would give the
sidecar, and ``injector.yaml`` through the webhook's loader
(``proxy.inject.config.load_injector_config``): chart, sidecar and webhook
cannot drift apart unnoticed.

helm comes from $HELM, PATH or .ci/bin/helm (``.ci/install-helm`` puts it
there; ``.ci/run`` calls it).
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from proxy.config import load_config
from proxy.inject.admission import sidecar_container
from proxy.inject.config import InjectorConfig, load_injector_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "llm-sidecar"
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
DASHBOARD_FILES = sorted(CHART.glob("dashboards/*.json"))
MANUAL_EXAMPLE = CHART / "examples" / "manual-sidecar.yaml"
K8S_VERSIONS = ("1.28", "1.30")
NAMESPACE = "agents"
RELEASE = "llm-sidecar"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
INJECTOR_SIDECAR_KEYS = {"name", "image", "imagePullPolicy", "native", "port", "healthPort",
                         "metricsPort", "configMap", "env", "resources", "securityContext"}
# Values no ConfigMap may ever hold (the ci files use them too).
API_KEY = "sk-test-0123456789abcdef"
REDIS_PASSWORD = "s3cret-redis-pass"

Doc = dict[str, Any]
# libyaml's loader when PyYAML has it: renders carry ~150 KB of dashboards.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def find_helm() -> str | None:
    """$HELM, else helm on PATH, else the one .ci/install-helm puts in .ci/bin."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    local = ROOT / ".ci" / "bin" / "helm"
    return str(local) if os.access(local, os.X_OK) else None


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not found ($HELM, PATH, .ci/bin/helm): run .ci/install-helm")


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    """helm with ``args``; the result whatever the exit code."""
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def extra_args(values_file: Path) -> list[str]:
    """The helm flags a ci values file asks for in its ``# test-args:`` line."""
    for line in values_file.read_text().splitlines():
        if line.startswith("# test-args:"):
            return shlex.split(line.removeprefix("# test-args:"))
    return []


@functools.cache
def _render(args: tuple[str, ...], namespace: str, release: str) -> tuple[Doc, ...]:
    out = run_helm("template", release, str(CHART), "--namespace", namespace, *args)
    assert out.returncode == 0, f"helm template {' '.join(args)} failed:\n{out.stderr}"
    return tuple(d for d in yaml.load_all(out.stdout, Loader=YAML_LOADER) if d)


def render(*args: str, namespace: str = NAMESPACE, release: str = RELEASE) -> list[Doc]:
    """The chart rendered with ``args`` (cached: the tests only read the result)."""
    return list(_render(tuple(args), namespace, release))


def render_file(values_file: Path, *args: str) -> list[Doc]:
    """The chart rendered with a ci values file and its test-args."""
    return render("-f", str(values_file), *extra_args(values_file), *args)


def render_fails(*args: str, namespace: str = NAMESPACE) -> str:
    """helm template's error output for ``args``, which must fail."""
    out = run_helm("template", RELEASE, str(CHART), "--namespace", namespace, *args)
    assert out.returncode != 0, f"helm template {' '.join(args)} should fail"
    return out.stderr


def objects(docs: Sequence[Doc], kind: str) -> list[Doc]:
    """Every rendered object of ``kind``."""
    return [d for d in docs if d["kind"] == kind]


def one(docs: Sequence[Doc], kind: str, name_suffix: str = "") -> Doc:
    """The one rendered object of ``kind`` whose name ends with ``name_suffix``."""
    found = [d for d in objects(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}"
    return found[0]


def injector(docs: Sequence[Doc]) -> Doc:
    """The parsed injector.yaml of a render."""
    loaded: Doc = yaml.safe_load(one(docs, "ConfigMap", "-injector")["data"]["injector.yaml"])
    return loaded


def webhook_registration(docs: Sequence[Doc]) -> Doc:
    """The one webhook of the MutatingWebhookConfiguration."""
    hooks = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert len(hooks) == 1
    hook: Doc = hooks[0]
    return hook


def env_of(container_or_injector: Mapping[str, Any]) -> dict[str, Any]:
    """name -> value (str) or valueFrom (mapping) of an env list."""
    env = container_or_injector.get("env") or []
    return {v["name"]: v.get("value", v.get("valueFrom")) for v in env}


def secret_data(docs: Sequence[Doc]) -> dict[tuple[str, str], str]:
    """(secret name, key) -> decoded value, for every Secret the chart renders."""
    return {(s["metadata"]["name"], k): base64.b64decode(v).decode()
            for s in objects(docs, "Secret") for k, v in (s.get("data") or {}).items()}


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector selects an object with ``labels``."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise AssertionError(f"unknown selector operator {op}")
        if not ok:
            return False
    return True


def namespace_labels(name: str, **labels: str) -> dict[str, str]:
    """A namespace's labels, with the one the API server always sets."""
    return {"kubernetes.io/metadata.name": name, **labels}


# ------------------------------------------------------------------ validation


CERT_MANAGER_SPEC_KEYS = {
    "Issuer": {"selfSigned", "ca"},
    "Certificate": {"secretName", "isCA", "commonName", "dnsNames", "duration", "renewBefore",
                    "privateKey", "usages", "issuerRef"},
}


def check_cert_manager(doc: Doc) -> None:
    """A structural check of the cert-manager objects (CRDs: no schema offline)."""
    assert doc["apiVersion"] == "cert-manager.io/v1"
    assert doc["kind"] in CERT_MANAGER_SPEC_KEYS, doc["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert doc["metadata"]["namespace"] == NAMESPACE
    spec = doc["spec"]
    assert set(spec) <= CERT_MANAGER_SPEC_KEYS[doc["kind"]], set(spec)
    if doc["kind"] == "Issuer":
        assert len(spec) == 1
        assert spec.get("selfSigned") == {} or isinstance(spec["ca"]["secretName"], str)
    else:
        assert isinstance(spec["secretName"], str) and spec["secretName"]
        assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
        assert spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
        assert spec["privateKey"]["algorithm"] in ("RSA", "ECDSA", "Ed25519")
        for key in ("duration", "renewBefore"):
            if key in spec:
                assert re.fullmatch(r"\d+h", spec[key]), spec[key]
        if not spec.get("isCA"):
            assert spec["dnsNames"] and "server auth" in spec["usages"]


@pytest.fixture(scope="module", autouse=True)
def _schema_cache() -> Iterator[None]:
    """kubernetes-validate reads a 1.2 MB definitions file on every call: read it once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kubernetes_validate.utils, "schema_contents",
                   functools.cache(kubernetes_validate.utils.schema_contents))
        yield


def validate(doc: Doc, versions: Sequence[str]) -> None:
    """``doc`` is a valid object for every Kubernetes version in ``versions``."""
    if doc["apiVersion"].startswith("cert-manager.io/"):
        check_cert_manager(doc)
        return
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} is invalid for "
                                 f"Kubernetes {version}: {exc.message} at "
                                 f"{'.'.join(map(str, exc.path))}") from None


def kube_version(args: Sequence[str]) -> str | None:
    """The --kube-version among helm ``args``, as major.minor."""
    for flag, value in itertools.pairwise(args):
        if flag == "--kube-version":
            return ".".join(value.split(".")[:2])
    return None


def sidecar_environ(container: Mapping[str, Any], docs: Sequence[Doc]) -> dict[str, str]:
    """The sidecar's environment as the kubelet would give it: Secrets the chart
    renders are resolved, other Secrets and the downward API get stand-ins."""
    secrets = secret_data(docs)
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = var["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            stand_in = "redis://127.0.0.1:6390/0" if name.endswith("REDIS_URL") else "x"
            env[name] = secrets.get((ref["name"], ref["key"]), stand_in)
        else:
            env[name] = "stand-in"
    return env


# ------------------------------------------------------------------ the matrix


def lint(values_file: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    """helm lint with a ci values file (lint takes --kube-version, not --api-versions)."""
    args = extra_args(values_file)
    version = ["--kube-version", args[args.index("--kube-version") + 1]] \
        if "--kube-version" in args else []
    return run_helm("lint", str(CHART), "--namespace", NAMESPACE, "-f", str(values_file),
                    *version, *(["--strict"] if strict else []))


@pytest.fixture(scope="module")
def matrix() -> dict[tuple[Path, bool], subprocess.CompletedProcess[str]]:
    """Every lint of the matrix, run concurrently, and every ci render pre-warmed."""
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        renders = [pool.submit(render_file, f) for f in CI_VALUES]
        lints = {(f, strict): pool.submit(lint, f, strict)
                 for f in CI_VALUES for strict in (False, True)}
        for r in renders:
            r.result()
        return {key: future.result() for key, future in lints.items()}


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_lint(values_file: Path, strict: bool,
              matrix: dict[tuple[Path, bool], subprocess.CompletedProcess[str]]) -> None:
    out = matrix[values_file, strict]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


def test_matrix_covers_the_cases() -> None:
    assert {p.stem.removesuffix("-values") for p in CI_VALUES} >= {
        "defaults", "redis-url", "redis-sentinel", "redis-deploy-networkpolicy", "certmanager",
        "native-off", "pod-mode", "existing-secret", "telemetry"}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
@pytest.mark.usefixtures("matrix")
def test_render_is_valid(values_file: Path, tmp_path: Path) -> None:
    args = extra_args(values_file)
    docs = render_file(values_file)
    versions = sorted({*K8S_VERSIONS, *filter(None, [kube_version(args)])})
    names: set[tuple[str, str]] = set()
    for doc in docs:
        validate(doc, versions)
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in names, f"{key} rendered twice"
        names.add(key)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        if doc["kind"] != "MutatingWebhookConfiguration":
            assert doc["metadata"]["namespace"] in (NAMESPACE, "monitoring")

    # The sidecar's own loader accepts config.yaml with the env the webhook gives it.
    config_file = tmp_path / "config.yaml"
    config_file.write_text(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    if not objects(docs, "MutatingWebhookConfiguration"):
        load_config(config_file, environ={})
        return
    # The webhook's own loader accepts injector.yaml, and the container it
    # builds from it is a valid Kubernetes container.
    cfg = load_injector_config_from(docs, tmp_path)
    assert cfg.sidecar.config_map == one(docs, "ConfigMap", "-config")["metadata"]["name"]
    container = sidecar_container(cfg)
    validate(pod_with_sidecar(cfg, container), versions)
    sidecar_cfg = load_config(config_file, environ=sidecar_environ(container, docs))
    assert sidecar_cfg.server.port == cfg.sidecar.port
    assert sidecar_cfg.server.health_port == cfg.sidecar.health_port
    assert sidecar_cfg.telemetry.prometheus_port == cfg.sidecar.metrics_port


def pod_with_sidecar(cfg: InjectorConfig, container: Doc) -> Doc:
    """A Pod as the webhook leaves it: the sidecar, its volumes and an app container."""
    app = {"name": "agent", "image": "registry.example/agent:1",
           "env": [{"name": n, "value": cfg.base_url} for n in cfg.base_url_env]}
    spec: Doc = {"containers": [app],
                 "volumes": [{"name": "llm-sidecar-config",
                              "configMap": {"name": cfg.sidecar.config_map}},
                             {"name": "llm-sidecar-tmp", "emptyDir": {}}]}
    if cfg.sidecar.native:
        spec["initContainers"] = [container]
    else:
        spec["containers"].insert(0, container)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent"}, "spec": spec}


# ------------------------------------------------------------------ behaviour


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    image = injector(render())["sidecar"]["image"]
    assert image == f"ghcr.io/llm-sidecar/llm-sidecar:{project['version']}"


@pytest.mark.parametrize(("native", "version", "expected"), [
    ("auto", "1.27.0", False),
    ("auto", "1.28.5", False),
    ("auto", "1.29.0", True),
    ("auto", "1.30.2", True),
    ("false", "1.30.0", False),
    ("true", "1.28.0", True),
])
def test_native_sidecar_follows_kube_version(native: str, version: str,
                                             expected: bool) -> None:
    docs = render("--kube-version", version, "--set", f"injection.nativeSidecar={native}")
    assert injector(docs)["sidecar"]["native"] is expected


@pytest.mark.parametrize("mode", ["namespace", "pod", "namespace-and-pod"])
def test_webhook_selects_only_the_release_namespace(mode: str) -> None:
    docs = render("--set", f"injection.mode={mode}")
    hook = webhook_registration(docs)
    ns_sel, obj_sel = hook["namespaceSelector"], hook["objectSelector"]
    enabled = {"llm-sidecar.io/inject": "enabled"}

    for system in SYSTEM_NAMESPACES:
        assert not selector_matches(ns_sel, namespace_labels(system, **enabled))
    assert not selector_matches(ns_sel, namespace_labels("other-team", **enabled))
    assert selector_matches(ns_sel, namespace_labels(NAMESPACE, **enabled))
    # The namespace label is needed in the namespace modes only.
    assert selector_matches(ns_sel, namespace_labels(NAMESPACE)) is (mode == "pod")

    agent: dict[str, str] = {"app": "agent"}
    assert selector_matches(obj_sel, agent) is (mode == "namespace")
    assert selector_matches(obj_sel, {**agent, "llm-sidecar.io/inject": "true"})
    assert not selector_matches(obj_sel, {**agent, "llm-sidecar.io/inject": "false"})
    webhook_pod = one(docs, "Deployment", "-webhook")["spec"]["template"]["metadata"]["labels"]
    assert not selector_matches(obj_sel, webhook_pod)
    assert not selector_matches(obj_sel, {**webhook_pod, "llm-sidecar.io/inject": "true"})


def test_webhook_registration_defaults() -> None:
    docs = render()
    mwc = one(docs, "MutatingWebhookConfiguration")
    hook = webhook_registration(docs)
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "Never"
    assert hook["matchPolicy"] == "Equivalent"
    assert 1 <= hook["timeoutSeconds"] <= 30
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    service = one(docs, "Service", "-webhook")
    assert hook["clientConfig"]["service"] == {
        "name": service["metadata"]["name"], "namespace": NAMESPACE, "path": "/mutate",
        "port": service["spec"]["ports"][0]["port"]}
    # Registrations are cluster-wide: two releases of the same name in two
    # namespaces must not overwrite each other's.
    other = one(render(namespace="team-b"), "MutatingWebhookConfiguration")
    assert NAMESPACE in mwc["metadata"]["name"]
    assert other["metadata"]["name"] != mwc["metadata"]["name"]
    failing = webhook_registration(render("--set", "injection.failurePolicy=Fail"))
    assert failing["failurePolicy"] == "Fail"


def test_refuses_system_namespaces() -> None:
    for system in SYSTEM_NAMESPACES:
        assert "refusing to install into " + system in render_fails(namespace=system)


def test_injector_config_has_the_contract_shape() -> None:
    docs = render()
    doc = injector(docs)
    assert set(doc) == {"sidecar", "baseUrlEnv"}
    sidecar = doc["sidecar"]
    assert set(sidecar) == INJECTOR_SIDECAR_KEYS
    assert sidecar["name"] == "llm-sidecar"
    assert sidecar["imagePullPolicy"] == "IfNotPresent"
    assert sidecar["port"] == 8080 and sidecar["healthPort"] == 8081
    assert sidecar["metricsPort"] is None
    assert sidecar["configMap"] == f"{RELEASE}-config"
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "128Mi"},
                                    "limits": {"memory": "512Mi"}}
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["runAsUser"] == 10001
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert doc["baseUrlEnv"] == ["OPENAI_BASE_URL", "OPENAI_API_BASE"]
    # No upstream key, no Redis, no collector: agents' keys pass through.
    assert env_of(sidecar) == {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    assert not objects(docs, "Secret") or {s["type"] for s in objects(docs, "Secret")} == {
        "kubernetes.io/tls"}
    config = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    assert config["server"] == {"host": "127.0.0.1", "port": 8080}
    assert "api_key" not in config["upstream"]


def test_telemetry_values_become_otel_env(tmp_path: Path) -> None:
    docs = render_file(CHART / "ci" / "telemetry-values.yaml")
    sidecar = injector(docs)["sidecar"]
    env = env_of(sidecar)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == {
        "secretKeyRef": {"name": "otel-auth", "key": "headers"}}
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    assert set(env["OTEL_RESOURCE_ATTRIBUTES"].split(",")) == {
        "deployment.environment=production", "team=agents"}
    assert env["OTEL_METRIC_EXPORT_INTERVAL"] == "15000"
    assert sidecar["metricsPort"] == 9464
    config = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    assert config["telemetry"] == {"enabled": True, "service_name": "agents-llm-sidecar",
                                   "prometheus_port": 9464}
    # The webhook turns that into a container port named "metrics" and the
    # k8s.* attributes appended to the chart's.
    container = sidecar_container(load_injector_config_from(docs, tmp_path))
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
    attrs = env_of(container)["OTEL_RESOURCE_ATTRIBUTES"]
    assert attrs.startswith("deployment.environment=production,team=agents,k8s.pod.name=")


def load_injector_config_from(docs: Sequence[Doc], directory: Path) -> InjectorConfig:
    """The webhook's view of a render's injector.yaml (read from a file, as in its pod)."""
    path = directory / "injector.yaml"
    path.write_text(one(docs, "ConfigMap", "-injector")["data"]["injector.yaml"])
    return load_injector_config(path)


def test_config_values_merge_over_the_defaults(tmp_path: Path) -> None:
    docs = render_file(CHART / "ci" / "config-values.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    container = sidecar_container(load_injector_config_from(docs, tmp_path))
    cfg = load_config(path, environ=sidecar_environ(container, docs))
    assert [r.name for r in cfg.ratelimit.rules] == ["per-agent", "gpt4o-namespace"]
    assert cfg.ratelimit.rules[1].max_wait == "10s"
    assert cfg.cache.semantic is True
    assert cfg.routing.preset == "conservative"
    assert cfg.routing.budgets[0].on_hard == "cheapest"
    assert cfg.routing.retry.fallbacks == {"gpt-4o": ("gpt-4o-mini",)}
    # A user's false wins over the chart's true; untouched defaults stay.
    assert cfg.telemetry.enabled is False
    assert cfg.logging.level == "debug" and cfg.logging.format == "json"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    # The deployed Redis, without auth, reaches all three features.
    url = f"redis://{RELEASE}-redis.{NAMESPACE}.svc:6379/0"
    assert cfg.ratelimit.redis_url == cfg.cache.redis_url == cfg.routing.redis_url == url


@pytest.mark.parametrize("setting", [
    "config.upstream.api_key=sk-live-1",
    "config.upstreams.azure.api_key=sk-live-1",
    "config.ratelimit.redis_url=redis://:pw@r:6379",
])
def test_secrets_in_config_are_refused(setting: str) -> None:
    error = render_fails("--set", setting)
    assert "would put the key in a ConfigMap" in error or "goes through a Secret" in error
    assert "sk-live-1" not in error and ":pw@" not in error


def test_secret_values_never_reach_a_configmap() -> None:
    docs = render_file(CHART / "ci" / "redis-url-values.yaml", "--set",
                       "telemetry.otlp.endpoint=http://collector:4318")
    secrets = secret_data(docs)
    name = f"{RELEASE}-upstream"
    assert secrets[(name, "api-key")] == API_KEY
    assert REDIS_PASSWORD in secrets[(f"{RELEASE}-redis", "url")]
    leaked = [API_KEY, REDIS_PASSWORD]
    for cm in objects(docs, "ConfigMap"):
        for value in cm["data"].values():
            assert not any(s in value for s in leaked), cm["metadata"]["name"]
    env = env_of(injector(docs)["sidecar"])
    assert env["SIDECAR_UPSTREAM__API_KEY"] == {"secretKeyRef": {"name": name, "key": "api-key"}}
    for feature in ("RATELIMIT", "CACHE", "ROUTING"):
        assert env[f"SIDECAR_{feature}__REDIS_URL"] == {
            "secretKeyRef": {"name": f"{RELEASE}-redis", "key": "url"}}
    # The generated password of a deployed Redis too.
    deployed = render_file(CHART / "ci" / "redis-deploy-networkpolicy-values.yaml")
    password = secret_data(deployed)[(f"{RELEASE}-redis", "password")]
    assert len(password) == 32
    url = secret_data(deployed)[(f"{RELEASE}-redis", "url")]
    assert url == f"redis://:{password}@{RELEASE}-redis.{NAMESPACE}.svc:6379/0"
    for doc in deployed:
        if doc["kind"] != "Secret":
            assert password not in json.dumps(doc), doc["metadata"]["name"]


def test_existing_secrets_are_referenced_not_created() -> None:
    docs = render_file(CHART / "ci" / "existing-secret-values.yaml")
    assert {s["type"] for s in objects(docs, "Secret")} == {"kubernetes.io/tls"}
    sidecar = injector(docs)["sidecar"]
    env = env_of(sidecar)
    assert env["SIDECAR_UPSTREAM__API_KEY"] == {
        "secretKeyRef": {"name": "openai-credentials", "key": "OPENAI_API_KEY"}}
    assert env["SIDECAR_CACHE__REDIS_URL"] == {
        "secretKeyRef": {"name": "redis-credentials", "key": "REDIS_URL"}}
    digest = "sha256:" + "0123456789abcdef" * 4
    assert sidecar["image"] == f"registry.example/llm-sidecar:0.1.0@{digest}"
    webhook = one(docs, "Deployment", "-webhook")["spec"]["template"]["spec"]
    assert webhook["containers"][0]["image"] == sidecar["image"]
    assert webhook["imagePullSecrets"] == [{"name": "registry-example"}]


def test_redis_variants() -> None:
    sentinel = render_file(CHART / "ci" / "redis-sentinel-values.yaml")
    env = env_of(injector(sentinel)["sidecar"])
    assert "SIDECAR_ROUTING__REDIS_URL" not in env
    assert "SIDECAR_RATELIMIT__REDIS_CLUSTER" not in env
    assert secret_data(sentinel)[(f"{RELEASE}-redis", "url")].startswith(
        "redis+sentinel://:s3cret-redis-pass@sentinel-0.data.svc:26379,")

    cluster = env_of(injector(render_file(CHART / "ci" / "redis-cluster-values.yaml"))["sidecar"])
    assert cluster["SIDECAR_RATELIMIT__REDIS_CLUSTER"] == "true"
    assert "SIDECAR_CACHE__REDIS_URL" not in cluster
    assert "only rate limits support Redis Cluster" in render_fails(
        "--set", "redis.url=redis://c:6379", "--set", "redis.cluster=true")
    assert "set only one of" in render_fails(
        "--set", "redis.url=redis://c:6379", "--set", "redis.deploy=true")

    deployed = render_file(CHART / "ci" / "redis-deploy-networkpolicy-values.yaml")
    service = one(deployed, "Service", "-redis")
    pod = one(deployed, "Deployment", "-redis")["spec"]["template"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]},
                            pod["metadata"]["labels"])
    # In namespace mode Redis would otherwise get a sidecar of its own.
    assert not selector_matches(webhook_registration(deployed)["objectSelector"],
                                pod["metadata"]["labels"])
    redis = pod["spec"]["containers"][0]
    assert "--requirepass" in redis["args"] and "--save" in redis["args"]
    assert not pod["spec"].get("volumes", [{}])[0].get("persistentVolumeClaim")
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert redis["resources"]["limits"]["memory"]


def test_network_policies() -> None:
    docs = render_file(CHART / "ci" / "redis-deploy-networkpolicy-values.yaml")
    webhook_pod = one(docs, "Deployment", "-webhook")["spec"]["template"]
    redis_pod = one(docs, "Deployment", "-redis")["spec"]["template"]
    webhook_np = one(docs, "NetworkPolicy", "-webhook")["spec"]
    assert selector_matches(webhook_np["podSelector"], webhook_pod["metadata"]["labels"])
    assert not selector_matches(webhook_np["podSelector"], redis_pod["metadata"]["labels"])
    [rule] = webhook_np["ingress"]
    port_names = {p["name"] for p in webhook_pod["spec"]["containers"][0]["ports"]}
    assert [p["port"] for p in rule["ports"]] == ["https"] and "https" in port_names
    assert rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]

    redis_np = one(docs, "NetworkPolicy", "-redis")["spec"]
    assert selector_matches(redis_np["podSelector"], redis_pod["metadata"]["labels"])
    [rule] = redis_np["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    peers = [p["podSelector"] for p in rule["from"]]

    def admitted(labels: dict[str, str]) -> bool:
        return any(selector_matches(sel, labels) for sel in peers)

    assert admitted({"app": "agent"})
    assert not admitted({"app": "agent", "llm-sidecar.io/inject": "false"})
    assert not admitted(webhook_pod["metadata"]["labels"])
    assert admitted({"app": "redis-exporter"})
    pod_mode = render_file(CHART / "ci" / "redis-deploy-networkpolicy-values.yaml",
                           "--set", "injection.mode=pod")
    peers = [p["podSelector"] for p in one(pod_mode, "NetworkPolicy", "-redis")
             ["spec"]["ingress"][0]["from"]]
    assert not admitted({"app": "agent"})
    assert admitted({"app": "agent", "llm-sidecar.io/inject": "true"})
    assert not objects(render(), "NetworkPolicy")


def tls_handshake(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, hostname: str,
                  tmp_path: Path) -> None:
    """A TLS handshake in memory: the server certificate must verify against the CA
    for ``hostname``, as the API server checks it."""
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_pem.decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not finish")


def test_self_signed_tls_matches_the_ca_bundle(tmp_path: Path) -> None:
    docs = render("--set", "certManager.enabled=false")
    secret = one(docs, "Secret", "-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    hook = webhook_registration(docs)
    ca_bundle = hook["clientConfig"]["caBundle"]
    assert ca_bundle == secret["data"]["ca.crt"]
    assert "cert-manager.io/inject-ca-from" not in (
        one(docs, "MutatingWebhookConfiguration")["metadata"].get("annotations") or {})
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    service = f"{hook['clientConfig']['service']['name']}.{NAMESPACE}.svc"
    tls_handshake(data["ca.crt"], data["tls.crt"], data["tls.key"], service, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(data["ca.crt"], data["tls.crt"], data["tls.key"],
                      f"other.{NAMESPACE}.svc", tmp_path)
    # The webhook mounts exactly that Secret where its --tls-* flags point.
    pod = one(docs, "Deployment", "-webhook")["spec"]["template"]["spec"]
    assert mounted_files(pod) == {
        "/etc/llm-sidecar-injector/injector.yaml": ("configMap", f"{RELEASE}-injector"),
        "/etc/llm-sidecar-injector/tls/tls.crt": ("secret", secret["metadata"]["name"]),
        "/etc/llm-sidecar-injector/tls/tls.key": ("secret", secret["metadata"]["name"]),
    }


def mounted_files(pod_spec: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """path -> (source kind, name) of every file the webhook container gets from
    projected volumes."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    files: dict[str, tuple[str, str]] = {}
    for mount in pod_spec["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        for source in volume.get("projected", {}).get("sources", []):
            for kind, ref in source.items():
                for item in ref["items"]:
                    files[f"{mount['mountPath']}/{item['path']}"] = (kind, ref["name"])
    return files


@pytest.mark.parametrize("how", [
    ("--api-versions", "cert-manager.io/v1"),
    ("--set", "certManager.enabled=true"),
], ids=["auto-detected", "forced"])
def test_cert_manager_injects_the_ca(how: tuple[str, str]) -> None:
    docs = render(*how)
    annotations = one(docs, "MutatingWebhookConfiguration")["metadata"]["annotations"]
    certificate = one(docs, "Certificate", "-webhook-tls")
    assert annotations["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}")
    assert "caBundle" not in webhook_registration(docs)["clientConfig"]
    assert not objects(docs, "Secret")
    pod = one(docs, "Deployment", "-webhook")["spec"]["template"]["spec"]
    assert mounted_files(pod)["/etc/llm-sidecar-injector/tls/tls.crt"] == (
        "secret", certificate["spec"]["secretName"])
    service = webhook_registration(docs)["clientConfig"]["service"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    # The chain: self-signed Issuer -> CA Certificate -> CA Issuer -> serving Certificate.
    issuers = {i["metadata"]["name"]: i["spec"] for i in objects(docs, "Issuer")}
    ca_issuer = issuers[certificate["spec"]["issuerRef"]["name"]]
    ca_cert = one(docs, "Certificate", "-ca")
    assert ca_cert["spec"]["isCA"] is True
    assert ca_issuer == {"ca": {"secretName": ca_cert["spec"]["secretName"]}}
    assert issuers[ca_cert["spec"]["issuerRef"]["name"]] == {"selfSigned": {}}
    # Off by default when cert-manager is not installed.
    assert "annotations" not in one(render(), "MutatingWebhookConfiguration")["metadata"]


def test_cert_manager_with_a_platform_issuer() -> None:
    docs = render_file(CHART / "ci" / "certmanager-issuer-values.yaml")
    assert not objects(docs, "Issuer")
    [certificate] = objects(docs, "Certificate")
    assert certificate["spec"]["issuerRef"] == {
        "name": "platform-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_webhook_deployment() -> None:
    docs = render()
    deployment = one(docs, "Deployment", "-webhook")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    [container] = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["args"] == [
        "inject-webhook", "--config", "/etc/llm-sidecar-injector/injector.yaml",
        "--tls-cert", "/etc/llm-sidecar-injector/tls/tls.crt",
        "--tls-key", "/etc/llm-sidecar-injector/tls/tls.key", "--port", "8443"]
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert "priorityClassName" not in pod
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "injector"
    service = one(docs, "Service", "-webhook")["spec"]
    assert selector_matches({"matchLabels": service["selector"]}, labels)
    assert service["ports"][0]["targetPort"] == "https"
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 and selector_matches(pdb["selector"], labels)
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert selector_matches(term["podAffinityTerm"]["labelSelector"], labels)
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone",
                                                   "kubernetes.io/hostname"}
    assert all(selector_matches(c["labelSelector"], labels) for c in spread)

    hard = one(render_file(CHART / "ci" / "pod-mode-values.yaml"), "Deployment", "-webhook")
    hard_pod = hard["spec"]["template"]["spec"]
    assert hard_pod["priorityClassName"] == "system-cluster-critical"
    assert "requiredDuringSchedulingIgnoredDuringExecution" in hard_pod["affinity"][
        "podAntiAffinity"]


def test_injector_changes_roll_the_webhook() -> None:
    def checksum(*args: str) -> str:
        deployment = one(render(*args), "Deployment", "-webhook")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"][
            "checksum/injector"]
        return value

    base = checksum()
    assert checksum("--set", "dashboards.folder=other") == base
    assert checksum("--set", "injection.port=9090") != base
    assert checksum("--set", "sidecar.resources.limits.memory=1Gi") != base


def test_dashboards_configmaps() -> None:
    assert DASHBOARD_FILES, "no dashboards in the chart"
    docs = render()
    maps = [cm for cm in objects(docs, "ConfigMap")
            if cm["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(maps) == len(DASHBOARD_FILES)
    shipped: dict[str, Any] = {}
    for cm in maps:
        assert cm["metadata"]["annotations"] == {"grafana_folder": "llm-sidecar"}
        [(key, text)] = cm["data"].items()
        shipped[key] = json.loads(text)
    assert shipped == {p.name: json.loads(p.read_text()) for p in DASHBOARD_FILES}
    assert all(d["uid"] == name.removesuffix(".json") for name, d in shipped.items())

    custom = render("--set", "dashboards.label=my_dashboards", "--set",
                    "dashboards.labelValue=yes", "--set", "dashboards.folder=",
                    "--set", "dashboards.namespace=monitoring")
    custom_maps = [cm for cm in objects(custom, "ConfigMap")
                   if cm["metadata"]["labels"].get("my_dashboards") == "yes"]
    assert len(custom_maps) == len(DASHBOARD_FILES)
    assert all(cm["metadata"]["namespace"] == "monitoring" and
               "annotations" not in cm["metadata"] for cm in custom_maps)
    off = render("--set", "dashboards.enabled=false")
    assert not [cm for cm in objects(off, "ConfigMap") if "grafana_dashboard"
                in cm["metadata"]["labels"]]


def test_injection_disabled_renders_only_configuration() -> None:
    docs = render_file(CHART / "ci" / "manual-values.yaml")
    assert {d["kind"] for d in docs} == {"ConfigMap", "Secret"}
    assert [d["metadata"]["name"] for d in objects(docs, "ConfigMap")] == [f"{RELEASE}-config"]
    assert [d["metadata"]["name"] for d in objects(docs, "Secret")] == [f"{RELEASE}-upstream"]


def test_manual_example_matches_what_the_webhook_injects(tmp_path: Path) -> None:
    example = yaml.safe_load(MANUAL_EXAMPLE.read_text())
    validate(example, ("1.29", "1.30"))
    pod = example["spec"]["template"]
    [sidecar] = pod["spec"]["initContainers"]
    # The same values with the webhook on: what it would inject.
    docs = render("--set", f"upstream.apiKey.value={API_KEY}")
    cfg = load_injector_config_from(docs, tmp_path)
    assert sidecar == sidecar_container(cfg)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["llm-sidecar-config"]["configMap"]["name"] == cfg.sidecar.config_map
    [app] = pod["spec"]["containers"]
    assert env_of(app) == dict.fromkeys(cfg.base_url_env, cfg.base_url)
    # What the example uses exists in the --set injection.enabled=false render.
    manual = render("--set", f"upstream.apiKey.value={API_KEY}",
                    "--set", "injection.enabled=false")
    one(manual, "ConfigMap", "-config")
    ref = env_of(sidecar)["SIDECAR_UPSTREAM__API_KEY"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) in secret_data(manual)
    # A pod with the sidecar by hand is left alone by the webhook.
    assert not selector_matches(webhook_registration(docs)["objectSelector"],
                                pod["metadata"]["labels"])


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as helm install would print it. helm template skips NOTES.txt and
    .Files cannot read templates/, so a copy of the chart renders it into a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "NOTES.src").write_text((chart / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "NOTES.src") . | quote }}}\n')
    out = run_helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
                   "--show-only", "templates/zz-notes.yaml", *args)
    assert out.returncode == 0, out.stderr
    notes: str = yaml.safe_load(out.stdout)["data"]["notes"]
    return notes


def test_notes_tell_how_to_select_and_verify(tmp_path: Path) -> None:
    notes = render_notes(tmp_path)
    assert f"kubectl label namespace {NAMESPACE} llm-sidecar.io/inject=enabled" in notes
    assert "{.spec.initContainers[*].name}" in notes
    assert "-- env | grep OPENAI_BASE_URL" in notes
    assert "OPENAI_BASE_URL=http://127.0.0.1:8080/v1" in notes
    assert "failurePolicy is Ignore" in notes
    assert f"{RELEASE}-dashboard-* in namespace\n{NAMESPACE}" in notes
    assert "grafana_dashboard=\"1\"" in notes

    pod_mode = render_notes(tmp_path / "pod", "--set", "injection.mode=pod",
                            "--set", "dashboards.enabled=false")
    assert "kubectl label namespace" not in pod_mode
    assert 'llm-sidecar.io/inject: "true"' in pod_mode
    assert "dashboard" not in pod_mode

    manual = render_notes(tmp_path / "manual", "--set", "injection.enabled=false")
    assert "examples/manual-sidecar.yaml" in manual
    assert "kubectl label" not in manual


@pytest.mark.parametrize(("setting", "message"), [
    ("injection.mdoe=pod", "Additional property mdoe is not allowed"),
    ("injection.mode=pods", "injection.mode must be one of the following"),
    ("injection.failurePolicy=ignore", "injection.failurePolicy must be one of the following"),
    ("injection.port=http", "injection.port: Invalid type. Expected: integer"),
    ("telemetry.traces.ratio=1.5", "telemetry.traces.ratio: Does not match pattern"),
    ("telemetry.traces.ratio=-0.5", "telemetry.traces.ratio: Does not match pattern"),
    ("redis.url=http://redis:6379", "redis.url: Does not match pattern"),
    ("certManager.enabled=maybe", "certManager.enabled must be one of the following"),
])
def test_schema_rejects_bad_values(setting: str, message: str) -> None:
    error = render_fails("--set", setting)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


def test_schema_checks_numbers_given_as_numbers() -> None:
    error = render_fails("--set-json", "telemetry.traces.ratio=1.5")
    assert "telemetry.traces.ratio: Must be less than or equal to 1" in error
    env = env_of(injector(render("--set", "telemetry.traces.sampler=traceidratio",
                                 "--set", "telemetry.traces.ratio=0.25"))["sidecar"])
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"


def test_values_are_documented_and_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    seen: set[tuple[str, ...]] = set()
    for path, documented in value_keys((CHART / "values.yaml").read_text()):
        parent = schema_node(schema, path[:-1])
        if parent is None or "properties" not in parent:
            continue  # inside a free-form value (resources, securityContext, ...)
        assert path[-1] in parent["properties"], f"{'.'.join(path)} is not in the schema"
        assert documented, f"{'.'.join(path)} has no comment above it in values.yaml"
        seen.add(path)
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def optional(path: tuple[str, ...]) -> bool:
        """Inside an object values.yaml leaves empty (certManager.issuerRef: {})."""
        node = values
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        return node == {}

    declared = {p for p in schema_paths(schema) if not optional(p)} - {("global",)}
    assert declared <= seen, f"in the schema, not in values.yaml: {sorted(declared - seen)}"


def value_keys(text: str) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(key path, whether a comment line is right above it) for each block key."""
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            yield tuple(k for _, k in stack), previous.lstrip().startswith("#")
        if line.strip():
            previous = line


def schema_node(schema: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any] | None:
    """The schema of the value at ``path``; None past a free-form value."""
    node: Mapping[str, Any] | None = schema
    for key in path:
        if node is None:
            return None
        node = (node.get("properties") or {}).get(key)
    return node


def schema_paths(schema: Mapping[str, Any],
                 prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every property path the schema declares."""
    for key, sub in (schema.get("properties") or {}).items():
        yield (*prefix, key)
        yield from schema_paths(sub, (*prefix, key))
