"""The model catalog: where each model is served, what it costs and what it can do.

The package ships a dated catalog (``data/catalog.yaml``); ``routing.catalog``
in the config changes fields of shipped models or adds models. Everything
that prices a request (routing estimates, budgets, cost metrics, the
``x-sidecar-cost-usd`` header) reads the one Catalog the app builds at start.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.config import CAPABILITIES, ModelConfig
from proxy.wire.usage import Usage

_PER_TOKEN = 1e-6
# gpt-4o-2024-08-06, gpt-4-0613, o1-2024-12-17: the snapshot's family prices it.
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
_REQUIRED = ("input_per_1m", "output_per_1m", "context_window", "max_output")


class CatalogError(ValueError):
    """The catalog (shipped or configured) is unusable; ``problems`` name each field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model's prices (USD per token), limits and capabilities."""

    name: str
    upstream: str | None
    serves: str
    input_price: float
    cached_input_price: float
    output_price: float
    context_window: int
    max_output: int
    capabilities: frozenset[str]

    def cost(self, usage: Usage) -> float:
        """What an answer with this usage cost, in USD (cached input at its own price)."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        return ((usage.input_tokens - cached) * self.input_price
                + cached * self.cached_input_price
                + usage.output_tokens * self.output_price)

    def estimate(self, input_tokens: int, output_tokens: int) -> float:
        """A request's cost before it is sent, in USD (no cache discount assumed)."""
        return input_tokens * self.input_price + output_tokens * self.output_price


class Catalog:
    """Models by name; a dated snapshot name resolves to its family's entry."""

    def __init__(self, models: Mapping[str, ModelSpec], as_of: str) -> None:
        self.models = dict(models)
        self.as_of = as_of
        self._resolved: dict[str, ModelSpec | None] = {}

    def __len__(self) -> int:
        return len(self.models)

    def get(self, model: str) -> ModelSpec | None:
        """The spec for a requested model name, or None if the catalog does not know it."""
        try:
            return self._resolved[model]
        except KeyError:
            pass
        spec = self.models.get(model)
        if spec is None:
            family = _SNAPSHOT.sub("", model)
            spec = self.models.get(family) if family != model else None
        # Bounded: a client can send any model name.
        if len(self._resolved) > 4096:
            self._resolved.clear()
        self._resolved[model] = spec
        return spec

    def cost(self, model: str, usage: Usage | None) -> float | None:
        """USD for an answer of ``model`` with ``usage``; None if either is unknown."""
        if usage is None:
            return None
        spec = self.get(model)
        return None if spec is None else spec.cost(usage)


@functools.cache
def _shipped() -> dict[str, Any]:
    text = importlib.resources.files("proxy.routing").joinpath("data/catalog.yaml").read_text(
        encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise CatalogError(["shipped catalog: missing 'models' mapping"])
    return doc


def shipped_entries() -> dict[str, ModelConfig]:
    """The shipped catalog's entries as config objects (for validation and docs)."""
    out: dict[str, ModelConfig] = {}
    for name, fields in _shipped()["models"].items():
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in fields.items()}
        out[str(name)] = ModelConfig(**values)
    return out


def build_catalog(overrides: Mapping[str, ModelConfig],
                  upstreams: frozenset[str] | None = None) -> Catalog:
    """The shipped catalog with ``overrides`` applied (field by field), validated.

    ``upstreams`` are the configured upstream names; when given, a model placed
    on an unknown upstream is kept but flagged by :func:`unreachable_models`.
    Raises CatalogError naming every bad field as ``routing.catalog.<model>.<field>``.
    """
    merged = shipped_entries()
    for name, entry in overrides.items():
        base = merged.get(name)
        if base is None:
            merged[name] = entry
        else:
            changes = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)
                       if getattr(entry, f.name) is not None}
            merged[name] = dataclasses.replace(base, **changes)
    problems: list[str] = []
    models: dict[str, ModelSpec] = {}
    for name, entry in merged.items():
        spec = _spec(name, entry, f"routing.catalog.{name}", problems)
        if spec is not None:
            models[name] = spec
    if problems:
        raise CatalogError(problems)
    return Catalog(models, str(_shipped().get("as_of", "")))


def unreachable_models(catalog: Catalog, upstreams: frozenset[str]) -> set[str]:
    """Models placed on an upstream that is not configured (usable by no policy)."""
    return {name for name, spec in catalog.models.items()
            if spec.upstream is not None and spec.upstream not in upstreams}


def _spec(name: str, entry: ModelConfig, where: str, problems: list[str]) -> ModelSpec | None:
    missing = [f for f in _REQUIRED if getattr(entry, f) is None]
    for f in missing:
        problems.append(f"{where}.{f}: required for a model the catalog does not ship")
    caps = entry.capabilities or ()
    unknown = [c for c in caps if c not in CAPABILITIES]
    for c in unknown:
        problems.append(f"{where}.capabilities: unknown capability {c!r} "
                        f"(one of {', '.join(CAPABILITIES)})")
    if missing or unknown:
        return None
    assert entry.input_per_1m is not None and entry.output_per_1m is not None
    assert entry.context_window is not None and entry.max_output is not None
    if entry.max_output > entry.context_window:
        problems.append(f"{where}.max_output: must be <= context_window "
                        f"({entry.context_window}), got {entry.max_output}")
        return None
    cached = entry.cached_input_per_1m
    if cached is not None and cached > entry.input_per_1m:
        problems.append(f"{where}.cached_input_per_1m: must be <= input_per_1m "
                        f"({entry.input_per_1m}), got {cached}")
        return None
    return ModelSpec(
        name=name, upstream=entry.upstream, serves=entry.serves or name,
        input_price=entry.input_per_1m * _PER_TOKEN,
        cached_input_price=(entry.input_per_1m if cached is None else cached) * _PER_TOKEN,
        output_price=entry.output_per_1m * _PER_TOKEN,
        context_window=entry.context_window, max_output=entry.max_output,
        capabilities=frozenset(caps))
