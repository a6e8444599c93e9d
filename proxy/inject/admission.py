"""AdmissionReview v1 in, AdmissionReview v1 out: the sidecar injection as an RFC 6902 patch.

Pure logic, no I/O. ``parse_review`` checks the envelope (a bad one is the
caller's HTTP 400), ``decide`` chooses what to do with the pod and builds the
patch, ``respond`` wraps the decision into the response document. Every answer
is ``allowed: true``: the injector never blocks a pod; what it skipped and why
is said in the response's warnings (which kubectl prints).

Choices a user may need to know:

- Only ``containers`` get the base URL variables, never init containers, and
  never a variable the container already sets in ``env``.
- A container with ``envFrom`` gets none of them, with a warning: explicit
  ``env`` beats ``envFrom`` in Kubernetes, so setting them would silently
  override a value the user's ConfigMap or Secret may hold.
- Opt-out values (label or annotation ``llm-sidecar.io/inject``): ``false``,
  ``disabled``, ``no``, ``off``, ``0``, in any case.
- The patch edits the app containers at their original indices first and
  inserts the sidecar last, so the insert at ``containers/0`` (classic mode)
  cannot shift a path the patch still uses.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.inject.config import OTEL_RESOURCE_ATTRIBUTES, InjectorConfig, kind_of, thaw

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
INJECT_KEY = "llm-sidecar.io/inject"
STATUS_KEY = "llm-sidecar.io/status"
STATUS_INJECTED = "injected"
DEFAULT_CONTAINER_KEY = "kubectl.kubernetes.io/default-container"
CONFIG_VOLUME = "llm-sidecar-config"
TMP_VOLUME = "llm-sidecar-tmp"
CONFIG_DIR = "/etc/llm-sidecar"
OPT_OUT_VALUES = frozenset({"false", "disabled", "no", "off", "0"})
READY_TIMEOUT_S = 60
_DOWNWARD_ENV = (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                 ("POD_UID", "metadata.uid"), ("NODE_NAME", "spec.nodeName"))

Op = dict[str, Any]


class BadReview(ValueError):
    """The document is not an AdmissionReview v1 request (answered with HTTP 400)."""


class _Unreadable(ValueError):
    """The pod has a shape the injector cannot patch safely."""


@dataclass(frozen=True, slots=True)
class Review:
    """The parts of an AdmissionReview request the injector uses."""

    uid: str
    operation: str
    group: str
    version: str
    kind: str
    sub_resource: str
    namespace: str
    dry_run: bool
    obj: Any

    def describe(self) -> str:
        """``namespace/name`` of the object, for logs (``generateName*`` when unnamed)."""
        meta = self.obj.get("metadata") if isinstance(self.obj, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        name = meta.get("name") or (f"{meta.get('generateName')}*"
                                    if meta.get("generateName") else "(unnamed)")
        namespace = self.namespace or meta.get("namespace") or ""
        return f"{namespace}/{name}" if namespace else str(name)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer: the patch (empty: none), warnings, and a one-line outcome for logs."""

    patch: tuple[Op, ...] = ()
    warnings: tuple[str, ...] = ()
    outcome: str = ""

    @staticmethod
    def failed() -> Decision:
        """The answer after an internal error: the pod goes ahead without the sidecar."""
        return Decision(warnings=(_warning("not injected: internal error in the injector "
                                           "(see its log)"),), outcome="error")


def parse_review(doc: Any) -> Review:
    """Check the AdmissionReview envelope; raises BadReview naming what is wrong."""
    if not isinstance(doc, Mapping):
        raise BadReview(f"body must be a JSON object (an AdmissionReview), got {_kind(doc)}")
    if doc.get("apiVersion") != API_VERSION:
        raise BadReview(f"apiVersion: expected {API_VERSION!r}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        raise BadReview(f"kind: expected {KIND!r}, got {doc.get('kind')!r}")
    request = doc.get("request")
    if not isinstance(request, Mapping):
        raise BadReview(f"request: expected an object, got {_kind(request)}")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview(f"request.uid: expected a non-empty string, got {uid!r}")
    operation = request.get("operation")
    if not isinstance(operation, str):
        raise BadReview(f"request.operation: expected a string, got {operation!r}")
    gvk = request.get("kind")
    if not isinstance(gvk, Mapping) or not isinstance(gvk.get("kind"), str):
        raise BadReview("request.kind: expected an object with group, version and kind")
    strings = {}
    for key, value in (("request.kind.group", gvk.get("group", "")),
                       ("request.kind.version", gvk.get("version", "")),
                       ("request.subResource", request.get("subResource", "")),
                       ("request.namespace", request.get("namespace", ""))):
        if value is not None and not isinstance(value, str):
            raise BadReview(f"{key}: expected a string, got {value!r}")
        strings[key] = value or ""
    dry_run = request.get("dryRun", False)
    if dry_run is not None and not isinstance(dry_run, bool):
        raise BadReview(f"request.dryRun: expected a boolean, got {dry_run!r}")
    return Review(uid=uid, operation=operation, group=strings["request.kind.group"],
                  version=strings["request.kind.version"], kind=gvk["kind"],
                  sub_resource=strings["request.subResource"],
                  namespace=strings["request.namespace"], dry_run=bool(dry_run),
                  obj=request.get("object"))


def respond(uid: str, decision: Decision) -> dict[str, Any]:
    """The AdmissionReview v1 response document for ``decision``."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(list(decision.patch))).decode()
    if decision.warnings:
        response["warnings"] = list(decision.warnings)
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def admit(doc: Any, cfg: InjectorConfig) -> dict[str, Any]:
    """parse_review + decide + respond: the whole answer to one request document."""
    review = parse_review(doc)
    return respond(review.uid, decide(review, cfg))


def decide(review: Review, cfg: InjectorConfig) -> Decision:
    """Whether and how to inject the sidecar into the pod under review."""
    target = f"{review.operation} {review.kind}" + (
        f"/{review.sub_resource}" if review.sub_resource else "")
    if ((review.group, review.version, review.kind) != ("", "v1", "Pod")
            or review.sub_resource or review.operation != "CREATE"):
        return Decision(outcome=f"ignored: {target}")
    try:
        return _decide_pod(review.obj, cfg)
    except _Unreadable as exc:
        return Decision(warnings=(_warning(f"not injected: {exc}"),),
                        outcome=f"skipped: {exc}")


def _decide_pod(pod: Any, cfg: InjectorConfig) -> Decision:
    if not isinstance(pod, Mapping):
        raise _Unreadable(f"request.object is {_kind(pod)}, not a pod")
    meta = _mapping(pod.get("metadata"), "metadata")
    spec = _mapping(pod.get("spec"), "spec")
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    containers = _items(spec.get("containers"), "spec.containers")
    inits = _items(spec.get("initContainers"), "spec.initContainers")
    if not containers:
        raise _Unreadable("spec.containers is empty")
    for where, marks in (("annotation", annotations), ("label", labels)):
        if str(marks.get(INJECT_KEY, "")).strip().lower() in OPT_OUT_VALUES:
            return Decision(outcome=f"skipped: opted out by {where} {INJECT_KEY}")
    name = cfg.sidecar.name
    if annotations.get(STATUS_KEY) == STATUS_INJECTED or any(
            c.get("name") == name for c in (*containers, *inits)):
        return Decision(outcome="skipped: already injected")
    if spec.get("hostNetwork") is True:
        return Decision(warnings=(_warning(
            "not injected: the pod uses hostNetwork, where the sidecar's ports could clash "
            "with the node's"),), outcome="skipped: hostNetwork")
    conflict = _port_conflict(containers, inits, cfg)
    if conflict:
        return Decision(warnings=(_warning(f"not injected: {conflict}"),),
                        outcome=f"skipped: {conflict}")
    warnings: list[str] = []
    patch = [*_annotation_ops(pod, annotations, containers, cfg),
             *_app_env_ops(containers, cfg, warnings),
             *_sidecar_ops(spec, cfg)]
    if not cfg.sidecar.native and spec.get("restartPolicy") in ("Never", "OnFailure"):
        warnings.append(_warning(
            "classic (non-native) sidecar in a run-to-completion pod: it keeps running after "
            "the app exits; use native sidecars (Kubernetes >= 1.29)"))
    mode = "native" if cfg.sidecar.native else "classic"
    return Decision(tuple(patch), tuple(warnings), outcome=f"injected ({mode} sidecar)")


def _port_conflict(containers: list[dict[str, Any]], inits: list[dict[str, Any]],
                   cfg: InjectorConfig) -> str | None:
    sc = cfg.sidecar
    ours = {sc.port: "port", sc.health_port: "healthPort"}
    if sc.metrics_port is not None:
        ours[sc.metrics_port] = "metricsPort"
    # Restartable init containers run beside the app, so they share its ports.
    running = [*containers, *(c for c in inits if c.get("restartPolicy") == "Always")]
    for i, container in enumerate(running):
        for port in _items(container.get("ports"), f"ports of container {i}"):
            number = port.get("containerPort")
            if number in ours and (port.get("protocol") or "TCP") == "TCP":
                return (f"container {container.get('name')!r} declares containerPort {number}, "
                        f"the sidecar's {ours[number]}")
    return None


def _annotation_ops(pod: Mapping[str, Any], annotations: Mapping[str, Any],
                    containers: list[dict[str, Any]], cfg: InjectorConfig) -> list[Op]:
    added = {STATUS_KEY: STATUS_INJECTED}
    if not cfg.sidecar.native and DEFAULT_CONTAINER_KEY not in annotations:
        # The sidecar becomes containers[0]; keep `kubectl logs/exec` on the app.
        added[DEFAULT_CONTAINER_KEY] = str(containers[0].get("name"))
    if pod.get("metadata") is None:
        return [_add("/metadata", {"annotations": added})]
    if pod["metadata"].get("annotations") is None:
        return [_add("/metadata/annotations", added)]
    return [_add(f"/metadata/annotations/{escape(key)}", value) for key, value in added.items()]


def _app_env_ops(containers: list[dict[str, Any]], cfg: InjectorConfig,
                 warnings: list[str]) -> list[Op]:
    ops: list[Op] = []
    for i, container in enumerate(containers):
        env = _items(container.get("env"), f"spec.containers[{i}].env")
        present = {var.get("name") for var in env}
        missing = [name for name in cfg.base_url_env if name not in present]
        if not missing:
            continue
        if container.get("envFrom"):
            warnings.append(_warning(
                f"container {container.get('name')!r} uses envFrom: {', '.join(missing)} left "
                f"unset on it (an explicit env would override envFrom); set "
                f"{'it' if len(missing) == 1 else 'them'} to {cfg.base_url} to use the sidecar"))
            continue
        values = [{"name": name, "value": cfg.base_url} for name in missing]
        if container.get("env") is None:
            ops.append(_add(f"/spec/containers/{i}/env", values))
        else:
            ops.extend(_add(f"/spec/containers/{i}/env/-", var) for var in values)
    return ops


def _sidecar_ops(spec: Mapping[str, Any], cfg: InjectorConfig) -> list[Op]:
    taken = {v.get("name") for v in _items(spec.get("volumes"), "spec.volumes")}
    config_volume = _free_name(CONFIG_VOLUME, taken)
    tmp_volume = _free_name(TMP_VOLUME, taken | {config_volume})
    volumes = [{"name": config_volume, "configMap": {"name": cfg.sidecar.config_map}},
               {"name": tmp_volume, "emptyDir": {}}]
    ops = ([_add("/spec/volumes", volumes)] if spec.get("volumes") is None
           else [_add("/spec/volumes/-", v) for v in volumes])
    container = sidecar_container(cfg, config_volume, tmp_volume)
    if not cfg.sidecar.native:
        ops.append(_add("/spec/containers/0", container))
    elif spec.get("initContainers") is None:
        ops.append(_add("/spec/initContainers", [container]))
    else:
        # First, so it is up before init containers that may call the API.
        ops.append(_add("/spec/initContainers/0", container))
    return ops


def sidecar_container(cfg: InjectorConfig, config_volume: str = CONFIG_VOLUME,
                      tmp_volume: str = TMP_VOLUME) -> dict[str, Any]:
    """The sidecar's Container object, as the contract describes it."""
    sc = cfg.sidecar
    ports = [{"name": "proxy", "containerPort": sc.port, "protocol": "TCP"},
             {"name": "health", "containerPort": sc.health_port, "protocol": "TCP"}]
    if sc.metrics_port is not None:
        ports.append({"name": "metrics", "containerPort": sc.metrics_port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": sc.name,
        "image": sc.image,
        "imagePullPolicy": sc.image_pull_policy,
        "args": ["serve", "--config", f"{CONFIG_DIR}/config.yaml",
                 "--host", "127.0.0.1", "--port", str(sc.port)],
        "ports": ports,
        "env": _sidecar_env(cfg),
        "volumeMounts": [{"name": config_volume, "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": tmp_volume, "mountPath": "/tmp"}],
        # The startup probe holds liveness off (and, for a native sidecar, the
        # containers after it) until the proxy answers.
        "startupProbe": _probe(sc.health_port, "/healthz", period_s=1, failures=60),
        "readinessProbe": _probe(sc.health_port, "/readyz", period_s=5, failures=2),
        "livenessProbe": _probe(sc.health_port, "/healthz", period_s=10, failures=3),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if sc.resources is not None:
        container["resources"] = thaw(sc.resources)
    if sc.security_context is not None:
        container["securityContext"] = thaw(sc.security_context)
    if sc.native:
        container["restartPolicy"] = "Always"
    else:
        # kubelet starts the next container only once postStart returns, so
        # the app never starts before its proxy is ready.
        container["lifecycle"] = {"postStart": {"exec": {"command": [
            "llm-sidecar", "wait-ready", "--url",
            f"http://127.0.0.1:{sc.health_port}/readyz", "--timeout", str(READY_TIMEOUT_S)]}}}
    return container


def _sidecar_env(cfg: InjectorConfig) -> list[dict[str, Any]]:
    sc = cfg.sidecar
    # Declared first: $(VAR) references resolve only to variables defined earlier.
    env: list[dict[str, Any]] = [
        {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}
        for name, path in _DOWNWARD_ENV]
    env.append({"name": "SIDECAR_SERVER__HEALTH_PORT", "value": str(sc.health_port)})
    if sc.metrics_port is not None:
        env.append({"name": "SIDECAR_TELEMETRY__PROMETHEUS_PORT", "value": str(sc.metrics_port)})
    given = ""
    for var in sc.env:
        if var.get("name") == OTEL_RESOURCE_ATTRIBUTES:
            given = str(var.get("value") or "").strip().strip(",")
        else:
            env.append(thaw(var))
    ours = ",".join([*(f"k8s.{attr}=$({name})" for attr, name in (
        ("pod.name", "POD_NAME"), ("namespace.name", "POD_NAMESPACE"),
        ("pod.uid", "POD_UID"), ("node.name", "NODE_NAME"))), f"k8s.container.name={sc.name}"])
    env.append({"name": OTEL_RESOURCE_ATTRIBUTES, "value": f"{given},{ours}" if given else ours})
    return env


def _probe(port: int, path: str, *, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port, "scheme": "HTTP"},
            "periodSeconds": period_s, "timeoutSeconds": 2, "failureThreshold": failures}


def escape(key: str) -> str:
    """A JSON Pointer reference token for ``key`` (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return key.replace("~", "~0").replace("/", "~1")


def _add(path: str, value: Any) -> Op:
    return {"op": "add", "path": path, "value": value}


def _free_name(base: str, taken: set[Any]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Unreadable(f"{where} is {_kind(value)}, not an object")
    return value


def _items(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _Unreadable(f"{where} is not a list of objects")
    return value


def _warning(text: str) -> str:
    return f"llm-sidecar: {text}"


def _kind(value: Any) -> str:
    return kind_of(value, "an object", "an array")
