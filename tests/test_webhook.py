"""The sidecar injection webhook: admission logic on real AdmissionReview documents, the
patched pods against the Kubernetes schema, and the server over real HTTP(S).

The fixtures in tests/data/admission are AdmissionReview v1 requests shaped as the API
server sends them (defaulted pod specs, service-account volume, managedFields, ...).
Patches are applied with the small RFC 6902 applier below rather than the ``jsonpatch``
package: the webhook only emits ``add``, and a strict applier of our own fails loudly on
a path the API server would reject (missing parent, index past the end).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import kubernetes_validate
import orjson
import pytest

from loadtest.bench import free_port
from loadtest.loop_thread import LoopThread
from proxy.cli import main
from proxy.inject import server as webhook_server
from proxy.inject.admission import BadReview, admit, escape, parse_review
from proxy.inject.config import (
    InjectorConfig,
    InjectorConfigError,
    load_injector_config,
    parse_injector_config,
)
from proxy.inject.server import TlsFiles, build_app, running

FIXTURES = Path(__file__).parent / "data" / "admission"
BASE_URL = "http://127.0.0.1:8080/v1"
SERVICE_DNS = "llm-sidecar-injector.llm-sidecar.svc"
K8S_VERSIONS = ("1.29", "1.30")

# As the Helm chart renders it (ConfigMap <fullname>-injector, key injector.yaml).
INJECTOR_YAML = """\
sidecar:
  name: llm-sidecar
  image: ghcr.io/llm-sidecar/llm-sidecar:0.1.0
  imagePullPolicy: IfNotPresent
  native: true
  port: 8080
  healthPort: 8081
  metricsPort: 9464
  configMap: agents-llm-sidecar-config
  env:
    - name: SIDECAR_UPSTREAM__API_KEY
      valueFrom:
        secretKeyRef: {name: agents-llm-sidecar-upstream, key: api-key}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: http://otel-collector.observability:4318
    - name: OTEL_RESOURCE_ATTRIBUTES
      value: deployment.environment=prod
  resources: {requests: {cpu: 50m, memory: 128Mi}, limits: {memory: 512Mi}}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities: {drop: [ALL]}
baseUrlEnv: [OPENAI_BASE_URL, OPENAI_API_BASE]
"""


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> InjectorConfig:
    path = tmp_path_factory.mktemp("injector") / "injector.yaml"
    path.write_text(INJECTOR_YAML)
    return load_injector_config(path)


@pytest.fixture(scope="module")
def classic(native: InjectorConfig) -> InjectorConfig:
    return dataclasses.replace(native, sidecar=dataclasses.replace(native.sidecar, native=False))


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((FIXTURES / name).read_bytes())
    return doc


def _tokens(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _index(token: str, size: int, *, append_ok: bool) -> int:
    assert re.fullmatch(r"0|[1-9][0-9]*", token), f"bad array index {token!r}"
    index = int(token)
    assert index <= size if append_ok else index < size, f"index {index} out of range"
    return index


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/replace/remove/test, strict about paths; returns a new document."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _tokens(op["path"])
        target = doc
        for token in parents:
            target = (target[_index(token, len(target), append_ok=False)]
                      if isinstance(target, list) else target[token])
        value = copy.deepcopy(op.get("value"))
        kind = op["op"]
        if isinstance(target, list):
            if kind == "add":
                if last == "-":
                    target.append(value)
                else:
                    target.insert(_index(last, len(target), append_ok=True), value)
                continue
            index = _index(last, len(target), append_ok=False)
        else:
            assert isinstance(target, dict), f"{op['path']}: parent is not a container"
            if kind == "add":
                target[last] = value
                continue
            assert last in target, f"{op['path']}: no such member"
            index = last  # type: ignore[assignment]
        if kind == "replace":
            target[index] = value
        elif kind == "remove":
            del target[index]
        elif kind == "test":
            assert target[index] == value, f"test failed at {op['path']}"
        else:
            raise AssertionError(f"unsupported op {kind}")
    return doc


def run(doc: dict[str, Any], cfg: InjectorConfig) -> tuple[dict[str, Any], list[Any]]:
    """Admit ``doc``; checks the response envelope, returns (response, patch ops)."""
    out = admit(doc, cfg)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    resp: dict[str, Any] = out["response"]
    assert resp["uid"] == doc["request"]["uid"]
    assert resp["allowed"] is True
    if "patch" not in resp:
        assert "patchType" not in resp
        return resp, []
    assert resp["patchType"] == "JSONPatch"
    ops: list[Any] = orjson.loads(base64.b64decode(resp["patch"], validate=True))
    assert ops, "an empty patch must be left out"
    return resp, ops


def inject(doc: dict[str, Any], cfg: InjectorConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(patched pod, response); the patch must exist and the pod pass every check."""
    resp, ops = run(doc, cfg)
    assert ops, resp
    pod: dict[str, Any] = apply_patch(doc["request"]["object"], ops)
    check_pod(pod)
    return pod, resp


def resubmit(doc: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """The same request carrying ``pod`` (as when a second webhook call sees our output)."""
    again = copy.deepcopy(doc)
    again["request"]["object"] = pod
    again["request"]["uid"] = "ffffffff-0000-4000-8000-000000000001"
    return again


def api_server_rules(pod: dict[str, Any]) -> list[str]:
    """Pod validation the API server does beyond the OpenAPI schema (the parts at risk)."""
    problems = []
    spec = pod["spec"]
    inits, apps = spec.get("initContainers") or [], spec["containers"]
    names = [c["name"] for c in inits + apps]
    if len(names) != len(set(names)):
        problems.append(f"duplicate container names {names}")
    volumes = [v["name"] for v in spec.get("volumes") or []]
    if len(volumes) != len(set(volumes)):
        problems.append(f"duplicate volume names {volumes}")
    for c in apps:
        if "restartPolicy" in c:
            problems.append(f"container {c['name']}: restartPolicy is for init containers only")
    for c in inits:
        if c.get("restartPolicy") not in (None, "Always"):
            problems.append(f"init container {c['name']}: restartPolicy must be Always")
        if c.get("restartPolicy") != "Always":
            for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
                if key in c:
                    problems.append(f"init container {c['name']}: {key} needs restartPolicy")
    for c in inits + apps:
        for mount in c.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                problems.append(f"{c['name']}: mount of unknown volume {mount['name']}")
        env = [e["name"] for e in c.get("env") or []]
        if len(env) != len(set(env)):
            problems.append(f"{c['name']}: duplicate env {env}")
        ports = [p.get("name") for p in c.get("ports") or [] if p.get("name")]
        if len(ports) != len(set(ports)) or any(len(p) > 15 for p in ports):
            problems.append(f"{c['name']}: bad port names {ports}")
    return problems


def check_pod(pod: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    assert api_server_rules(pod) == []


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def by_name(containers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in containers}


# ------------------------------------------------------------------ admission


def test_native_injection_of_a_deployment_pod(native: InjectorConfig) -> None:
    doc = fixture("deployment-pod.json")
    original = doc["request"]["object"]
    pod, resp = inject(doc, native)
    assert "warnings" not in resp
    assert pod["metadata"]["annotations"] == {"llm-sidecar.io/status": "injected"}
    assert "name" not in pod["metadata"]  # generateName pods stay unnamed

    sidecar = pod["spec"]["initContainers"][0]
    assert len(pod["spec"]["initContainers"]) == 1
    assert sidecar["name"] == "llm-sidecar" and sidecar["restartPolicy"] == "Always"
    assert "lifecycle" not in sidecar
    assert sidecar["image"] == "ghcr.io/llm-sidecar/llm-sidecar:0.1.0"
    assert sidecar["imagePullPolicy"] == "IfNotPresent"
    assert sidecar["args"] == ["serve", "--config", "/etc/llm-sidecar/config.yaml",
                               "--host", "127.0.0.1", "--port", "8080"]
    assert [(p["name"], p["containerPort"]) for p in sidecar["ports"]] == [
        ("proxy", 8080), ("health", 8081), ("metrics", 9464)]
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": 8081, "scheme": "HTTP"}
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "128Mi"},
                                    "limits": {"memory": "512Mi"}}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    env = [e["name"] for e in sidecar["env"]]
    # Downward API first: $(VAR) only resolves to variables defined earlier.
    assert env == ["POD_NAME", "POD_NAMESPACE", "POD_UID", "NODE_NAME",
                   "SIDECAR_SERVER__HEALTH_PORT", "SIDECAR_TELEMETRY__PROMETHEUS_PORT",
                   "SIDECAR_UPSTREAM__API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT",
                   "OTEL_RESOURCE_ATTRIBUTES"]
    values = env_of(sidecar)
    assert values["POD_UID"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}}
    assert values["NODE_NAME"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert values["SIDECAR_SERVER__HEALTH_PORT"] == "8081"
    assert values["SIDECAR_UPSTREAM__API_KEY"] == {"secretKeyRef": {
        "name": "agents-llm-sidecar-upstream", "key": "api-key"}}
    assert values["OTEL_RESOURCE_ATTRIBUTES"] == (
        "deployment.environment=prod,k8s.pod.name=$(POD_NAME),"
        "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.uid=$(POD_UID),"
        "k8s.node.name=$(NODE_NAME),k8s.container.name=llm-sidecar")
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/etc/llm-sidecar"] == {"name": "llm-sidecar-config",
                                          "mountPath": "/etc/llm-sidecar", "readOnly": True}
    volumes = by_name(pod["spec"]["volumes"])
    assert volumes["llm-sidecar-config"] == {"name": "llm-sidecar-config",
                                             "configMap": {"name": "agents-llm-sidecar-config"}}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {}

    agent = pod["spec"]["containers"][0]
    assert env_of(agent)["OPENAI_BASE_URL"] == env_of(agent)["OPENAI_API_BASE"] == BASE_URL
    # Nothing else changed: take the additions out and get the original back.
    restored = copy.deepcopy(pod)
    del restored["metadata"]["annotations"], restored["spec"]["initContainers"]
    restored["spec"]["volumes"] = restored["spec"]["volumes"][:-2]
    restored["spec"]["containers"][0]["env"] = agent["env"][:-2]
    assert restored == original


def test_native_sidecar_goes_before_existing_init_containers(native: InjectorConfig) -> None:
    doc = fixture("init-containers.json")
    pod, _ = inject(doc, native)
    inits = pod["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["llm-sidecar", "migrate-db", "fetch-prompts"]
    assert inits[0]["restartPolicy"] == "Always"
    assert all("restartPolicy" not in c for c in inits[1:])
    # Init containers keep their env: only app containers point at the sidecar.
    assert "env" not in inits[1]
    assert env_of(inits[2]) == {"PROMPT_BUCKET": "s3://prompts/memory-agent"}
    assert env_of(pod["spec"]["containers"][0]) == {
        "DATA_DIR": "/data", "OPENAI_BASE_URL": BASE_URL, "OPENAI_API_BASE": BASE_URL}
    assert pod["metadata"]["name"] == "memory-agent-0"


def test_classic_injection_shifts_nothing_the_patch_still_uses(classic: InjectorConfig) -> None:
    doc = fixture("existing-base-url.json")
    pod, resp = inject(doc, classic)
    assert "warnings" not in resp
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["llm-sidecar", "agent", "tool-runner"]
    assert "initContainers" not in pod["spec"]
    sidecar = containers[0]
    assert "restartPolicy" not in sidecar
    assert sidecar["lifecycle"] == {"postStart": {"exec": {"command": [
        "llm-sidecar", "wait-ready", "--url", "http://127.0.0.1:8081/readyz",
        "--timeout", "60"]}}}
    # The user's own OPENAI_BASE_URL stays, and only the missing variable is added.
    assert containers[1]["env"] == [
        {"name": "OPENAI_BASE_URL", "value": "http://llm-gateway.platform.svc:4000/v1"},
        {"name": "OPENAI_API_BASE", "value": BASE_URL}]
    assert containers[2]["env"] == [{"name": "OPENAI_BASE_URL", "value": BASE_URL},
                                    {"name": "OPENAI_API_BASE", "value": BASE_URL}]
    # Existing annotations kept; kubectl logs/exec keep defaulting to the app.
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9100",
        "llm-sidecar.io/status": "injected", "kubectl.kubernetes.io/default-container": "agent"}


def test_patch_paths_escape_annotation_keys_and_extend_existing_lists(
        native: InjectorConfig) -> None:
    _, ops = run(fixture("existing-base-url.json"), native)
    paths = [op["path"] for op in ops]
    assert "/metadata/annotations/llm-sidecar.io~1status" in paths
    assert "/spec/containers/0/env/-" in paths  # env exists: append
    assert "/spec/containers/1/env" in paths  # no env: create the list
    assert paths.count("/spec/volumes/-") == 2
    assert all(op["op"] == "add" for op in ops)
    assert escape("a~b/c") == "a~0b~1c"
    # No annotations at all: the map is created whole.
    _, ops = run(fixture("deployment-pod.json"), native)
    assert ops[0] == {"op": "add", "path": "/metadata/annotations",
                      "value": {"llm-sidecar.io/status": "injected"}}


INJECTED = ["deployment-pod.json", "existing-base-url.json", "init-containers.json",
            "env-from.json", "dry-run-bare-pod.json"]


@pytest.mark.parametrize("mode", ["native", "classic"])
@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_idempotent_on_its_own_output(name: str, mode: str, request: pytest.FixtureRequest) -> None:
    cfg: InjectorConfig = request.getfixturevalue(mode)
    doc = fixture(name)
    resp, ops = run(doc, cfg)
    assert bool(ops) == (name in INJECTED), resp
    if not ops:
        return
    pod = apply_patch(doc["request"]["object"], ops)
    check_pod(pod)
    again, ops_again = run(resubmit(doc, pod), cfg)
    assert ops_again == [] and "warnings" not in again


def test_a_sidecar_container_added_by_hand_counts_as_injected(native: InjectorConfig) -> None:
    doc = fixture("already-injected.json")
    assert "annotations" not in doc["request"]["object"]["metadata"]
    resp, ops = run(doc, native)
    assert ops == [] and "warnings" not in resp


@pytest.mark.parametrize("where", ["annotations", "labels"])
@pytest.mark.parametrize("value", ["false", "False", "disabled", "off"])
def test_opt_out_by_annotation_or_label(native: InjectorConfig, where: str, value: str) -> None:
    name = "opt-out-annotation.json" if where == "annotations" else "opt-out-label.json"
    doc = fixture(name)
    doc["request"]["object"]["metadata"][where]["llm-sidecar.io/inject"] = value
    resp, ops = run(doc, native)
    assert ops == [] and "warnings" not in resp
    # Any other value does not opt out.
    doc["request"]["object"]["metadata"][where]["llm-sidecar.io/inject"] = "true"
    assert run(doc, native)[1]


def test_env_from_containers_are_left_alone_with_a_warning(
        native: InjectorConfig, classic: InjectorConfig) -> None:
    doc = fixture("env-from.json")
    pod, resp = inject(doc, native)
    apps = by_name(pod["spec"]["containers"])
    assert "env" not in apps["eval"]
    assert apps["eval"]["envFrom"] == doc["request"]["object"]["spec"]["containers"][0]["envFrom"]
    assert env_of(apps["report"])["OPENAI_BASE_URL"] == BASE_URL
    assert resp["warnings"] == [
        "llm-sidecar: container 'eval' uses envFrom: OPENAI_BASE_URL, OPENAI_API_BASE left "
        "unset on it (an explicit env would override envFrom); set them to "
        "http://127.0.0.1:8080/v1 to use the sidecar"]
    # A Job's pod with a classic sidecar never completes: said as a warning.
    _, resp = inject(doc, classic)
    assert len(resp["warnings"]) == 2
    assert "run-to-completion" in resp["warnings"][1]


def test_host_network_pods_are_skipped_with_a_warning(native: InjectorConfig) -> None:
    resp, ops = run(fixture("host-network.json"), native)
    assert ops == []
    assert resp["warnings"] == ["llm-sidecar: not injected: the pod uses hostNetwork, where "
                                "the sidecar's ports could clash with the node's"]


def test_port_conflicts_skip_with_a_warning_naming_them(native: InjectorConfig) -> None:
    doc = fixture("port-conflict.json")
    resp, ops = run(doc, native)
    assert ops == []
    assert resp["warnings"] == ["llm-sidecar: not injected: container 'agent' declares "
                                "containerPort 8080, the sidecar's port"]
    port = doc["request"]["object"]["spec"]["containers"][0]["ports"][0]
    port["containerPort"] = 8081
    assert run(doc, native)[0]["warnings"] == [
        "llm-sidecar: not injected: container 'agent' declares containerPort 8081, "
        "the sidecar's healthPort"]
    port["containerPort"], port["protocol"] = 8080, "UDP"  # UDP does not clash with TCP
    inject(doc, native)


def test_volume_names_never_clash(native: InjectorConfig) -> None:
    doc = fixture("deployment-pod.json")
    spec = doc["request"]["object"]["spec"]
    spec["volumes"] += [{"name": "llm-sidecar-config", "emptyDir": {}},
                        {"name": "llm-sidecar-tmp", "emptyDir": {}},
                        {"name": "llm-sidecar-config-1", "emptyDir": {}}]
    pod, _ = inject(doc, native)  # check_pod: unique names, mounts resolve
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["initContainers"][0]["volumeMounts"]}
    assert mounts == {"/etc/llm-sidecar": "llm-sidecar-config-2", "/tmp": "llm-sidecar-tmp-1"}
    assert by_name(pod["spec"]["volumes"])["llm-sidecar-config-2"]["configMap"] == {
        "name": "agents-llm-sidecar-config"}


def test_pods_without_volumes_or_metadata_annotations_get_the_lists_created(
        classic: InjectorConfig) -> None:
    doc = fixture("dry-run-bare-pod.json")
    del doc["request"]["object"]["spec"]["volumes"]
    del doc["request"]["object"]["spec"]["containers"][0]["volumeMounts"]
    pod, _ = inject(doc, classic)
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["llm-sidecar-config",
                                                           "llm-sidecar-tmp"]


@pytest.mark.parametrize("name", ["update-pod.json", "configmap-create.json",
                                  "pod-binding.json"])
def test_only_pod_creation_is_mutated(native: InjectorConfig, name: str) -> None:
    resp, ops = run(fixture(name), native)
    assert ops == [] and "warnings" not in resp


def test_dry_run_gets_the_same_answer(native: InjectorConfig) -> None:
    doc = fixture("dry-run-bare-pod.json")
    assert doc["request"]["dryRun"] is True
    real = copy.deepcopy(doc)
    real["request"]["dryRun"] = False
    assert run(doc, native)[1] == run(real, native)[1] != []


@pytest.mark.parametrize("mutate, problem", [
    (lambda pod: pod["spec"].__setitem__("containers", "agent"),
     "spec.containers is not a list of objects"),
    (lambda pod: pod["spec"].__setitem__("containers", []), "spec.containers is empty"),
    (lambda pod: pod["metadata"].__setitem__("annotations", ["x"]),
     "metadata.annotations is an array, not an object"),
    (lambda pod: pod.__setitem__("spec", None) or pod.__setitem__("spec", 3),
     "spec is a number, not an object"),
])
def test_unreadable_pods_are_allowed_unchanged_with_a_warning(
        native: InjectorConfig, mutate: Any, problem: str) -> None:
    doc = fixture("deployment-pod.json")
    mutate(doc["request"]["object"])
    resp, ops = run(doc, native)
    assert ops == []
    assert resp["warnings"] == [f"llm-sidecar: not injected: {problem}"]


@pytest.mark.parametrize("doc, message", [
    ([], "body must be a JSON object (an AdmissionReview), got an array"),
    ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}},
     "apiVersion: expected 'admission.k8s.io/v1', got 'admission.k8s.io/v1beta1'"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReviewList"},
     "kind: expected 'AdmissionReview', got 'AdmissionReviewList'"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
     "request: expected an object, got null"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
      "request": {"uid": 7}}, "request.uid: expected a non-empty string, got 7"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
      "request": {"uid": "u", "operation": "CREATE"}},
     "request.kind: expected an object with group, version and kind"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
      "request": {"uid": "u", "operation": "CREATE", "kind": {"kind": "Pod"},
                  "dryRun": "yes"}}, "request.dryRun: expected a boolean, got 'yes'"),
])
def test_malformed_reviews_are_named(doc: Any, message: str) -> None:
    with pytest.raises(BadReview) as err:
        parse_review(doc)
    assert str(err.value) == message


# ------------------------------------------------------------------ config


def test_config_as_the_chart_renders_it(native: InjectorConfig) -> None:
    sc = native.sidecar
    assert (sc.name, sc.native, sc.port, sc.health_port, sc.metrics_port) == (
        "llm-sidecar", True, 8080, 8081, 9464)
    assert native.base_url_env == ("OPENAI_BASE_URL", "OPENAI_API_BASE")
    assert native.base_url == BASE_URL
    assert native.source.endswith("injector.yaml")
    with pytest.raises(TypeError):  # read-only all the way down
        sc.env[0]["name"] = "X"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sc.port = 1  # type: ignore[misc]
    minimal = parse_injector_config({"sidecar": {"image": "img:1", "configMap": "cm"}})
    assert minimal.sidecar.security_context is not None
    assert minimal.sidecar.security_context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert minimal.sidecar.metrics_port is None and minimal.sidecar.native is True


BAD_YAML = """\
sidecar:
  name: LLM_Sidecar
  imagePullPolicy: Sometimes
  native: "yes"
  port: 70000
  healthPort: 8081
  metricsPort: 8081
  configMap: My Config
  env:
    - name: POD_NAME
      value: x
    - name: RETRIES
      value: 3
    - name: OTEL_RESOURCE_ATTRIBUTES
      valueFrom: {configMapKeyRef: {name: a, key: b}}
  resources: {requests: {memory: 128MB}}
  securityContext: {runAsUsr: 1000}
  imagPullPolicy: Always
baseUrlEnv: [OPENAI_BASE_URL, OPENAI_BASE_URL]
"""

BAD_PROBLEMS = [
    "sidecar.imagPullPolicy: unknown key (did you mean 'imagePullPolicy'?)",
    "sidecar.name: must be a DNS-1123 label (lower-case letters, digits and '-', at most 63), "
    "got 'LLM_Sidecar'",
    "sidecar.image: required",
    "sidecar.imagePullPolicy: must be one of Always, IfNotPresent, Never, got 'Sometimes'",
    "sidecar.native: must be true or false, got 'yes'",
    "sidecar.port: must be an integer in 1..65535, got 70000",
    "sidecar.metricsPort: 8081 is already sidecar.healthPort",
    "sidecar.configMap: must be a ConfigMap name (DNS-1123 subdomain), got 'My Config'",
    "sidecar.env[0] (POD_NAME): reserved, the injector sets it (set from the downward API)",
    "sidecar.env[1] (RETRIES).value: must be a string (quote it in YAML), got a number 3",
    "sidecar.env[2] (OTEL_RESOURCE_ATTRIBUTES): must be a literal value: the injector appends "
    "the pod's k8s.* attributes to it",
    "sidecar.resources.requests.memory: not a Kubernetes quantity (like 50m, 128Mi, 1), "
    "got '128MB'",
    "sidecar.securityContext.runAsUsr: unknown key (did you mean 'runAsUser'?)",
    "baseUrlEnv[1]: OPENAI_BASE_URL is listed twice",
]


def test_config_errors_are_all_listed_by_path(tmp_path: Path) -> None:
    path = tmp_path / "injector.yaml"
    path.write_text(BAD_YAML)
    with pytest.raises(InjectorConfigError) as err:
        load_injector_config(path)
    assert err.value.problems == BAD_PROBLEMS


def test_cli_exits_2_listing_config_problems(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "injector.yaml"
    path.write_text(BAD_YAML)
    with pytest.raises(SystemExit) as exit_:
        main(["inject-webhook", "--config", str(path), "--port", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-sidecar: invalid injector configuration ({len(BAD_PROBLEMS)} "
                          f"problems):\n")
    assert all(f"  - {p}\n" in err for p in BAD_PROBLEMS)
    with pytest.raises(SystemExit) as exit_:
        main(["inject-webhook", "--config", str(tmp_path / "missing.yaml")])
    assert exit_.value.code == 2
    assert "missing.yaml: cannot read: No such file or directory" in capsys.readouterr().err


# ------------------------------------------------------------------ HTTP


class Webhook:
    """A webhook server on the test loop thread."""

    def __init__(self, lt: LoopThread, cfg: InjectorConfig, tls: TlsFiles | None = None,
                 max_body_bytes: int = 256 * 1024) -> None:
        self.lt = lt
        self.tls = tls
        self.stack = AsyncExitStack()
        app = build_app(cfg, tls, max_body_bytes=max_body_bytes)

        async def start() -> str:
            url: str = await self.stack.enter_async_context(
                running(app, "127.0.0.1", 0, tls))
            return url

        self.url = lt.call(start())

    def close(self) -> None:
        self.lt.call(self.stack.aclose())


def http(method: str, url: str, body: bytes | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def plain(loop_thread: LoopThread, native: InjectorConfig) -> Iterator[str]:
    hook = Webhook(loop_thread, native)
    yield hook.url
    hook.close()


def test_mutate_over_http(plain: str) -> None:
    doc = fixture("deployment-pod.json")
    status, body = http("POST", f"{plain}/mutate", orjson.dumps(doc))
    assert status == 200
    answer = orjson.loads(body)
    assert answer["response"]["uid"] == doc["request"]["uid"]
    check_pod(apply_patch(doc["request"]["object"],
                          orjson.loads(base64.b64decode(answer["response"]["patch"]))))
    assert http("GET", f"{plain}/healthz") == (200, b'{"status":"alive"}')
    assert http("GET", f"{plain}/readyz") == (200, b'{"status":"ready"}')


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "empty body: expected an AdmissionReview v1 JSON document"),
    (b'{"apiVersion": "admission.k8s.io/v1", ', 400, "body is not valid JSON: "),
    (b"\xff\xfe{}", 400, "body is not valid JSON: "),
    (b'"AdmissionReview"', 400, "not an AdmissionReview v1 request: body must be a JSON "
     "object (an AdmissionReview), got a string"),
    (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": '
     b'{"kind": {"kind": "Pod"}, "operation": "CREATE"}}', 400,
     "not an AdmissionReview v1 request: request.uid: expected a non-empty string, got None"),
])
def test_malformed_requests_get_a_400_naming_the_problem(
        plain: str, body: bytes, status: int, message: str) -> None:
    got, answer = http("POST", f"{plain}/mutate", body)
    assert got == status
    assert orjson.loads(answer)["error"].startswith(message)


def test_oversized_and_wrong_method_requests(plain: str) -> None:
    status, body = http("POST", f"{plain}/mutate", b"[" + b"0," * 200_000 + b"0]")
    assert status == 413 and b"Maximum request body size" in body
    assert http("GET", f"{plain}/mutate")[0] == 405
    assert http("POST", f"{plain}/validate", b"{}")[0] == 404


def test_internal_error_allows_the_pod_and_warns(
        plain: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(webhook_server, "decide", broken)
    doc = fixture("deployment-pod.json")
    with caplog.at_level(logging.ERROR, logger="proxy.inject"):
        status, body = http("POST", f"{plain}/mutate", orjson.dumps(doc))
    assert status == 200
    assert orjson.loads(body)["response"] == {
        "uid": doc["request"]["uid"], "allowed": True,
        "warnings": ["llm-sidecar: not injected: internal error in the injector (see its log)"]}
    record = next(r for r in caplog.records if r.name == "proxy.inject")
    assert "agents/research-agent-6d8f7b9c5d-*" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_wait_ready_polls_until_200_or_times_out(
        plain: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["wait-ready", "--url", f"{plain}/readyz", "--timeout", "5"])
    assert exit_.value.code == 0
    url = f"http://127.0.0.1:{free_port()}/readyz"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main(["wait-ready", "--url", url, "--timeout", "0.5", "--interval", "0.05"])
    assert exit_.value.code == 1 and time.monotonic() - started < 3
    assert f"{url} not ready after 0.5s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["wait-ready", "--url", f"{plain}/nothing", "--timeout", "0.2"])
    assert exit_.value.code == 1 and "(HTTP 404)" in capsys.readouterr().err


# ------------------------------------------------------------------ HTTPS


def make_cert(directory: Path, serial: int) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM, key PEM) for the injector's service name."""
    cert, key = directory / f"{serial}.crt", directory / f"{serial}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-set_serial", str(serial), "-subj", f"/CN={SERVICE_DNS}",
         "-addext", f"subjectAltName=DNS:{SERVICE_DNS},IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def install(path: Path, data: bytes) -> None:
    """Replace a file atomically, as kubelet updates a Secret volume."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def presented_serial(port: int, trust: ssl.SSLContext, server_name: str = "127.0.0.1") -> int:
    """The serial number of the certificate a new connection is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            trust.wrap_socket(raw, server_hostname=server_name) as tls:
        cert = tls.getpeercert()
    assert cert is not None
    return int(str(cert["serialNumber"]), 16)


def wait_for_serial(port: int, trust: ssl.SSLContext, serial: int) -> None:
    deadline = time.monotonic() + 10
    seen = presented_serial(port, trust)
    while seen != serial:
        assert time.monotonic() < deadline, f"still serving serial {seen}, not {serial}"
        time.sleep(0.02)
        seen = presented_serial(port, trust)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[bytes, bytes]]:
    directory = tmp_path_factory.mktemp("certs")
    return {serial: make_cert(directory, serial) for serial in (1001, 2002, 3003)}


def test_https_with_certificate_rotation(loop_thread: LoopThread, native: InjectorConfig,
                                         certs: dict[int, tuple[bytes, bytes]],
                                         tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(cert, certs[1001][0])
    install(key, certs[1001][1])
    tls = TlsFiles(cert, key)
    hook = Webhook(loop_thread, native, tls)
    try:
        assert hook.url.startswith("https://127.0.0.1:")
        port = int(hook.url.rsplit(":", 1)[1])
        trust = ssl.create_default_context(
            cadata="".join(c.decode() for c, _ in certs.values()))
        assert presented_serial(port, trust) == 1001
        # The API server connects by service name (SNI); that works the same.
        assert presented_serial(port, trust, SERVICE_DNS) == 1001
        doc = fixture("init-containers.json")
        status, body = http("POST", f"{hook.url}/mutate", orjson.dumps(doc), trust)
        assert status == 200 and "patch" in orjson.loads(body)["response"]

        install(cert, certs[2002][0])
        install(key, certs[2002][1])
        wait_for_serial(port, trust, 2002)
        assert presented_serial(port, trust, SERVICE_DNS) == 2002

        # Half-way through a rotation (new certificate, old key) the previous pair
        # stays in service, and the problem shows in /readyz ...
        install(cert, certs[3003][0])
        assert presented_serial(port, trust) == 2002
        status, body = http("GET", f"{hook.url}/readyz", context=trust)
        ready = orjson.loads(body)
        assert status == 200 and ready["tls"]["reloads"] == 1
        assert "cannot load" in ready["tls"]["last_error"]
        # ... until the key arrives.
        install(key, certs[3003][1])
        wait_for_serial(port, trust, 3003)
        status, body = http("GET", f"{hook.url}/readyz", context=trust)
        assert orjson.loads(body)["tls"] | {"loaded_at": 0} == {
            "cert": str(cert), "loaded_at": 0, "reloads": 2, "last_error": None}
    finally:
        hook.close()


def test_inject_webhook_process_serves_https_and_stops_on_sigterm(
        native: InjectorConfig, certs: dict[int, tuple[bytes, bytes]], tmp_path: Path) -> None:
    config = tmp_path / "injector.yaml"
    config.write_text(INJECTOR_YAML)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(certs[1001][0])
    key.write_bytes(certs[1001][1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "inject-webhook", "--config", str(config),
         "--tls-cert", str(cert), "--tls-key", str(key), "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, proc.kill)  # a hung start fails instead of hanging
    watchdog.start()
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:  # its own "listening" line, no polling
            found = re.search(r"listening on (https://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None, "the webhook did not start"
        trust = ssl.create_default_context(cadata=certs[1001][0].decode())
        assert http("GET", f"{url}/healthz", context=trust)[0] == 200
        doc = fixture("deployment-pod.json")
        status, body = http("POST", f"{url}/mutate", orjson.dumps(doc), trust)
        assert status == 200 and orjson.loads(body)["response"]["patchType"] == "JSONPatch"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "injected (native sidecar)" in proc.stderr.read()
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
