"""The request classifier: a tier ("simple", "standard", "complex") from request features.

Rules are data. The shipped ones live in ``data/classifier.yaml``
(:func:`load_default_rules`); ``routing.classifier_rules`` in the config
replaces them. A rule is a mapping::

    {"tier": "complex", "when": {<feature>: <condition>, ...}, "name": "optional label"}

- Rules are tried in order and the first that matches wins; when none does,
  the classifier's ``default_tier`` applies.
- Every condition in ``when`` must hold (AND). A rule without ``when`` (or
  with an empty one) always matches.
- A condition on a boolean feature is ``true`` or ``false``.
- A condition on a numeric feature is a mapping of operators (``gt``, ``ge``,
  ``lt``, ``le``, ``eq``) to numbers, all of which must hold:
  ``{est_input_tokens: {gt: 600, le: 6000}}``. A numeric feature that is
  unknown (None, e.g. ``max_output_tokens`` when the request sets no limit)
  never matches a numeric condition.
- ``any: [<when>, <when>, ...]`` inside a ``when`` holds when at least one of
  the listed mappings holds (OR); each listed mapping is itself a ``when``
  (AND of its conditions, and it may nest another ``any``).
- ``name`` labels the rule in the reason :meth:`Classifier.classify` returns;
  unnamed rules are reported as ``rule<index>``.

The features are those of :class:`proxy.routing.features.Features`. Rules are
validated and compiled to closures when the classifier is built, so a mistake
is reported by its path (``rules[2].when.prompt_chars: unknown operator
'gtt'``) at start, and :meth:`Classifier.classify` does no parsing per request.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.resources
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from proxy.routing.features import FEATURE_KINDS, Features

TIERS = ("simple", "standard", "complex")
HEADER = "x-sidecar-tier"

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
    "eq": operator.eq,
}
_RULE_KEYS = ("tier", "when", "name")
_ANY = "any"

Predicate = Callable[[Features], bool]


class ClassifierError(ValueError):
    """A classifier rule is invalid; the message names it by its path."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tier(value: Any, path: str) -> str:
    if not isinstance(value, str) or value not in TIERS:
        raise ClassifierError(
            f"{path}: unknown tier {value!r} (expected one of {', '.join(TIERS)})")
    return value


def _check_bool(name: str, value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ClassifierError(f"{path}: {name} is a boolean feature, expected true or false, "
                              f"got {_type_name(value)} {value!r}")
    return value


def _compile_bools(names: list[str], wanted: list[bool]) -> Predicate:
    """One predicate for all boolean conditions of a ``when``: a single attrgetter call."""
    if len(names) == 1:
        getter = operator.attrgetter(names[0])
        if wanted[0]:
            return lambda features: getter(features) is True
        return lambda features: getter(features) is False
    many = operator.attrgetter(*names)
    expected = tuple(wanted)
    return lambda features: many(features) == expected


def _compile_number(name: str, value: Any, path: str) -> Predicate:
    if not isinstance(value, Mapping) or not value:
        raise ClassifierError(
            f"{path}: {name} is a numeric feature, expected a mapping of "
            f"{'/'.join(_OPERATORS)} to numbers, got {_type_name(value)} {value!r}")
    tests: list[tuple[Callable[[Any, Any], bool], int | float]] = []
    for op, bound in value.items():
        if op not in _OPERATORS:
            raise ClassifierError(
                f"{path}: unknown operator {op!r}{_did_you_mean(str(op), list(_OPERATORS))}")
        if not _is_number(bound):
            raise ClassifierError(
                f"{path}.{op}: expected a number, got {_type_name(bound)} {bound!r}")
        tests.append((_OPERATORS[op], bound))
    getter = operator.attrgetter(name)
    if len(tests) == 1:
        # The common case, without the loop.
        (test, limit), = tests
        return lambda features: (
            (v := getter(features)) is not None and test(v, limit))
    frozen = tuple(tests)

    def check(features: Features) -> bool:
        v = getter(features)
        return v is not None and all(test(v, limit) for test, limit in frozen)

    return check


def _compile_when(when: Any, path: str) -> tuple[Predicate, ...]:
    """The conditions of a ``when`` mapping, each compiled to a predicate."""
    if not isinstance(when, Mapping):
        raise ClassifierError(f"{path}: expected a mapping of features to conditions, "
                              f"got {_type_name(when)}")
    predicates: list[Predicate] = []
    bool_names: list[str] = []
    bool_wanted: list[bool] = []
    for key, value in when.items():
        where = f"{path}.{key}"
        if key == _ANY:
            predicates.append(_compile_any(value, where))
            continue
        kind = FEATURE_KINDS.get(key) if isinstance(key, str) else None
        if kind is None:
            raise ClassifierError(
                f"{where}: unknown feature{_did_you_mean(str(key), list(FEATURE_KINDS))}")
        if kind == "bool":
            bool_names.append(key)
            bool_wanted.append(_check_bool(key, value, where))
        else:
            predicates.append(_compile_number(key, value, where))
    if bool_names:
        # Booleans first: cheapest, and they reject most requests.
        predicates.insert(0, _compile_bools(bool_names, bool_wanted))
    return tuple(predicates)


def _compile_any(value: Any, path: str) -> Predicate:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ClassifierError(f"{path}: expected a non-empty list of conditions, "
                              f"got {_type_name(value)} {value!r}")
    branches = tuple(_all(_compile_when(item, f"{path}[{i}]")) for i, item in enumerate(value))
    return lambda features: any(branch(features) for branch in branches)


def _all(predicates: tuple[Predicate, ...]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    return lambda features: all(predicate(features) for predicate in predicates)


class Classifier:
    """Assigns a request its tier by the first rule that matches its features."""

    __slots__ = ("_default", "_rules")

    def __init__(self, rules: Sequence[Mapping[str, Any]], default_tier: str = "standard"
                 ) -> None:
        """Validate and compile ``rules``; raise :class:`ClassifierError` naming a bad one."""
        self._default = _tier(default_tier, "default_tier")
        if not isinstance(rules, Sequence) or isinstance(rules, str | bytes):
            raise ClassifierError(f"rules: expected a list of rules, got {_type_name(rules)}")
        compiled: list[tuple[str, str, tuple[Predicate, ...]]] = []
        for index, rule in enumerate(rules):
            path = f"rules[{index}]"
            if not isinstance(rule, Mapping):
                raise ClassifierError(f"{path}: expected a mapping, got {_type_name(rule)}")
            for key in rule:
                if key not in _RULE_KEYS:
                    raise ClassifierError(
                        f"{path}.{key}: unknown key{_did_you_mean(str(key), _RULE_KEYS)} "
                        f"(a rule has {', '.join(_RULE_KEYS)})")
            if "tier" not in rule:
                raise ClassifierError(f"{path}.tier: missing")
            tier = _tier(rule["tier"], f"{path}.tier")
            name = rule.get("name")
            if name is None:
                name = f"rule{index}"
            elif not isinstance(name, str) or not name:
                raise ClassifierError(f"{path}.name: expected a non-empty string, "
                                      f"got {_type_name(name)} {name!r}")
            when = rule.get("when")
            predicates = () if when is None else _compile_when(when, f"{path}.when")
            compiled.append((tier, name, predicates))
        self._rules = tuple(compiled)

    def __len__(self) -> int:
        return len(self._rules)

    @property
    def default_tier(self) -> str:
        """The tier of a request no rule matches."""
        return self._default

    def classify(self, features: Features, header: str | None = None) -> tuple[str, str]:
        """The request's tier and why: ``"header"``, the matching rule's name, or ``"default"``.

        ``header`` is the ``x-sidecar-tier`` request header; a valid tier there
        (any case, surrounding spaces ignored) wins, anything else is ignored.
        """
        if header:
            wanted = header.strip().lower()
            if wanted in TIERS:
                return wanted, "header"
        for tier, name, predicates in self._rules:
            for predicate in predicates:
                if not predicate(features):
                    break
            else:
                return tier, name
        return self._default, "default"


@functools.cache
def _shipped_rules() -> list[dict[str, Any]]:
    text = importlib.resources.files("proxy.routing").joinpath("data/classifier.yaml").read_text(
        encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, list) or not all(isinstance(rule, dict) for rule in doc):
        raise ClassifierError("shipped classifier.yaml: expected a list of rule mappings")
    return doc


def load_default_rules() -> list[dict[str, Any]]:
    """The shipped rules (``proxy/routing/data/classifier.yaml``), a copy the caller may change."""
    return copy.deepcopy(_shipped_rules())
