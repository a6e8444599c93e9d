"""The injector's settings: ``injector.yaml`` as the Helm chart renders it, checked at start.

Every problem is collected and reported by its path (``sidecar.port: must be an
integer in 1..65535, got 'http'``), and an unknown key is named together with
the closest known one, so a bad chart value stops the webhook at start instead
of breaking every pod it would patch. The result is a frozen dataclass whose
nested mappings are read-only; patches are built from copies (``thaw``).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.config import ConfigError

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The portable form (C identifier plus - and .); newer API servers accept more.
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(
    r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_ENV_SOURCES = ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef", "fileKeyRef")
_RESOURCE_KEYS = ("requests", "limits", "claims")
_SECURITY_CONTEXT_KEYS = (
    "allowPrivilegeEscalation", "appArmorProfile", "capabilities", "privileged", "procMount",
    "readOnlyRootFilesystem", "runAsGroup", "runAsNonRoot", "runAsUser", "seLinuxOptions",
    "seccompProfile", "windowsOptions")
# Variables the injector sets on the sidecar itself, from the fields that own them.
RESERVED_ENV = {
    "POD_NAME": "set from the downward API",
    "POD_NAMESPACE": "set from the downward API",
    "POD_UID": "set from the downward API",
    "NODE_NAME": "set from the downward API",
    "SIDECAR_SERVER__HEALTH_PORT": "set from sidecar.healthPort",
    "SIDECAR_TELEMETRY__PROMETHEUS_PORT": "set from sidecar.metricsPort",
}
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
DEFAULT_BASE_URL_ENV = ("OPENAI_BASE_URL", "OPENAI_API_BASE")
DEFAULT_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
# The contract's hardening plus RuntimeDefault seccomp, which the "restricted"
# Pod Security level requires of every container.
DEFAULT_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"}}

_TOP_KEYS = ("sidecar", "baseUrlEnv")
_SIDECAR_KEYS = ("name", "image", "imagePullPolicy", "native", "port", "healthPort",
                 "metricsPort", "configMap", "env", "resources", "securityContext")


class InjectorConfigError(ConfigError):
    """Raised with every problem found in an injector config, each named by its path."""


def freeze(value: Any) -> Any:
    """A read-only deep copy of a YAML value: mappings become proxies, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A fresh, JSON-ready deep copy of a frozen value (dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """The container the webhook adds (the ``sidecar`` section)."""

    image: str
    config_map: str
    name: str = "llm-sidecar"
    image_pull_policy: str = "IfNotPresent"
    native: bool = True
    port: int = 8080
    health_port: int = 8081
    metrics_port: int | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    resources: Mapping[str, Any] | None = field(
        default_factory=lambda: freeze(DEFAULT_RESOURCES))
    security_context: Mapping[str, Any] | None = field(
        default_factory=lambda: freeze(DEFAULT_SECURITY_CONTEXT))


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """The whole injector configuration."""

    sidecar: SidecarSettings
    base_url_env: tuple[str, ...] = DEFAULT_BASE_URL_ENV
    source: str = "<injector config>"

    @property
    def base_url(self) -> str:
        """What app containers get in ``base_url_env``: the sidecar over loopback."""
        return f"http://127.0.0.1:{self.sidecar.port}/v1"


def load_injector_config(path: str | Path) -> InjectorConfig:
    """Read and check an ``injector.yaml``; raises InjectorConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InjectorConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise InjectorConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InjectorConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_injector_config(data, source=str(path))


def parse_injector_config(data: Any, source: str = "<injector config>") -> InjectorConfig:
    """Check an already parsed injector document; raises InjectorConfigError."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise InjectorConfigError(
            [f"{source}: must be a mapping with a `sidecar` section, got {kind_of(data)}"])
    _unknown_keys(data, _TOP_KEYS, "", problems)
    sidecar = _sidecar(data.get("sidecar"), problems)
    base_url_env = _base_url_env(data.get("baseUrlEnv", list(DEFAULT_BASE_URL_ENV)), problems)
    if problems or sidecar is None:
        raise InjectorConfigError(problems)
    return InjectorConfig(sidecar=sidecar, base_url_env=base_url_env, source=source)


def _sidecar(raw: Any, problems: list[str]) -> SidecarSettings | None:
    if raw is None:
        problems.append("sidecar: required (the container to inject)")
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"sidecar: must be a mapping, got {kind_of(raw)}")
        return None
    _unknown_keys(raw, _SIDECAR_KEYS, "sidecar.", problems)
    name = _string(raw, "name", "llm-sidecar", problems)
    if name and (len(name) > 63 or not _DNS_LABEL.match(name)):
        problems.append(f"sidecar.name: must be a DNS-1123 label (lower-case letters, digits "
                        f"and '-', at most 63), got {name!r}")
    image = _string(raw, "image", None, problems)
    if image is not None and (not image or any(c.isspace() for c in image)):
        problems.append(f"sidecar.image: must be a non-empty image reference, got {image!r}")
    pull = _string(raw, "imagePullPolicy", "IfNotPresent", problems)
    if pull is not None and pull not in PULL_POLICIES:
        problems.append(f"sidecar.imagePullPolicy: must be one of {', '.join(PULL_POLICIES)}, "
                        f"got {pull!r}")
    native = raw.get("native", True)
    if not isinstance(native, bool):
        problems.append(f"sidecar.native: must be true or false, got {native!r}")
    port = _port(raw, "port", 8080, problems)
    health_port = _port(raw, "healthPort", 8081, problems)
    metrics_port = _port(raw, "metricsPort", None, problems)
    named = [("port", port), ("healthPort", health_port), ("metricsPort", metrics_port)]
    for i, (key, value) in enumerate(named):
        for other, seen in named[:i]:
            if value is not None and value == seen:
                problems.append(f"sidecar.{key}: {value} is already sidecar.{other}")
    config_map = _string(raw, "configMap", None, problems)
    if config_map is not None and (len(config_map) > 253
                                   or not _DNS_SUBDOMAIN.match(config_map)):
        problems.append(f"sidecar.configMap: must be a ConfigMap name (DNS-1123 subdomain), "
                        f"got {config_map!r}")
    env = _env(raw.get("env"), problems)
    resources = _resources(raw.get("resources", DEFAULT_RESOURCES), problems)
    security = _security_context(raw.get("securityContext", DEFAULT_SECURITY_CONTEXT), problems)
    if (name is None or image is None or pull is None or config_map is None
            or not isinstance(native, bool) or port is None or health_port is None):
        return None
    return SidecarSettings(
        image=image, config_map=config_map, name=name, image_pull_policy=pull, native=native,
        port=port, health_port=health_port, metrics_port=metrics_port, env=env,
        resources=resources, security_context=security)


def _string(raw: Mapping[str, Any], key: str, default: str | None,
            problems: list[str]) -> str | None:
    value = raw.get(key, default)
    if value is None:
        problems.append(f"sidecar.{key}: required")
        return None
    if not isinstance(value, str):
        problems.append(f"sidecar.{key}: must be a string, got {kind_of(value)} {value!r}")
        return None
    return value


def _port(raw: Mapping[str, Any], key: str, default: int | None,
          problems: list[str]) -> int | None:
    value = raw.get(key, default)
    if value is None:
        if default is not None:  # explicitly null where a port is required
            problems.append(f"sidecar.{key}: required (an integer in 1..65535)")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        problems.append(f"sidecar.{key}: must be an integer in 1..65535, got {value!r}")
        return None
    return value


def _env(raw: Any, problems: list[str]) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"sidecar.env: must be a list of EnvVar objects, got {kind_of(raw)}")
        return ()
    seen: set[str] = set()
    for i, var in enumerate(raw):
        where = f"sidecar.env[{i}]"
        if not isinstance(var, Mapping):
            problems.append(f"{where}: must be an EnvVar mapping (name, value or valueFrom), "
                            f"got {kind_of(var)}")
            continue
        _unknown_keys(var, ("name", "value", "valueFrom"), where + ".", problems)
        name = var.get("name")
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            problems.append(f"{where}.name: must be an environment variable name, got {name!r}")
            continue
        where = f"{where} ({name})"
        if name in RESERVED_ENV:
            problems.append(f"{where}: reserved, the injector sets it ({RESERVED_ENV[name]})")
        if name in seen:
            problems.append(f"{where}: set twice")
        seen.add(name)
        value, source = var.get("value"), var.get("valueFrom")
        if value is not None and source is not None:
            problems.append(f"{where}: has both value and valueFrom")
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}.value: must be a string (quote it in YAML), "
                            f"got {kind_of(value)} {value!r}")
        if source is not None:
            if not isinstance(source, Mapping) or len(source) != 1 or next(
                    iter(source)) not in _ENV_SOURCES:
                problems.append(f"{where}.valueFrom: must have exactly one of "
                                f"{', '.join(_ENV_SOURCES)}")
            elif name == OTEL_RESOURCE_ATTRIBUTES:
                problems.append(f"{where}: must be a literal value: the injector appends the "
                                f"pod's k8s.* attributes to it")
    return tuple(freeze(var) for var in raw if isinstance(var, Mapping))


def _resources(raw: Any, problems: list[str]) -> Mapping[str, Any] | None:
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"sidecar.resources: must be a mapping, got {kind_of(raw)}")
        return None
    _unknown_keys(raw, _RESOURCE_KEYS, "sidecar.resources.", problems)
    for section in ("requests", "limits"):
        amounts = raw.get(section)
        if amounts is None:
            continue
        if not isinstance(amounts, Mapping):
            problems.append(f"sidecar.resources.{section}: must be a mapping of resource "
                            f"name to quantity, got {kind_of(amounts)}")
            continue
        for res, qty in amounts.items():
            if (isinstance(qty, bool) or not isinstance(qty, int | float | str)
                    or not _QUANTITY.match(str(qty))):
                problems.append(f"sidecar.resources.{section}.{res}: not a Kubernetes "
                                f"quantity (like 50m, 128Mi, 1), got {qty!r}")
    frozen: Mapping[str, Any] = freeze(raw)
    return frozen


def _security_context(raw: Any, problems: list[str]) -> Mapping[str, Any] | None:
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"sidecar.securityContext: must be a mapping, got {kind_of(raw)}")
        return None
    _unknown_keys(raw, _SECURITY_CONTEXT_KEYS, "sidecar.securityContext.", problems)
    frozen: Mapping[str, Any] = freeze(raw)
    return frozen


def _base_url_env(raw: Any, problems: list[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"baseUrlEnv: must be a list of variable names, got {kind_of(raw)}")
        return ()
    names: list[str] = []
    for i, name in enumerate(raw):
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            problems.append(f"baseUrlEnv[{i}]: must be an environment variable name, "
                            f"got {name!r}")
        elif name in names:
            problems.append(f"baseUrlEnv[{i}]: {name} is listed twice")
        else:
            names.append(name)
    return tuple(names)


def _unknown_keys(data: Mapping[Any, Any], known: Sequence[str], prefix: str,
                  problems: list[str]) -> None:
    for key in data:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
        problems.append(f"{prefix}{key}: unknown key{hint}")


def kind_of(value: Any, mapping: str = "a mapping", array: str = "a list") -> str:
    """How an error names a value's type (YAML words by default; JSON's on request)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return array
    if isinstance(value, Mapping):
        return mapping
    return type(value).__name__
