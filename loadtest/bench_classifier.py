"""What classifying a request costs: ``features_of`` + ``Classifier.classify``, in-process.

``.venv/bin/python -m loadtest.bench_classifier [--iterations N]`` (from the
repository root: the labelled requests come from
``tests/test_routing_classifier.py``).

Each case is timed call by call with ``time.perf_counter_ns`` (the timer's own
cost, about a tenth of a microsecond, is included) for ``--iterations`` calls,
after a warm-up, and reported as p50/p99 in microseconds:

``examples``      the labelled requests in turn (the mix of the test table)
``short``         a one-line greeting
``20KB-user``     a 20 KB last user turn (only its last 8,000 chars are scanned)
``20KB-system``   a 20 KB system prompt and a short question
``20KB-code``     a 20 KB last user turn that is code (stops at the first hints)

``features`` and ``classify`` columns time the two steps apart on the same
requests; ``total`` times them together, as the router calls them.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from proxy.routing.classifier import Classifier, load_default_rules
from proxy.routing.features import Features, features_of
from proxy.wire.canonical import Endpoint

ITERATIONS = 20_000
WARMUP = 1_000
KB = 1024

Case = tuple[Endpoint, dict[str, Any]]


def _examples() -> list[Case]:
    try:
        from tests.test_routing_classifier import EXAMPLES
    except ImportError as exc:  # an installed wheel has no tests/
        sys.exit(f"run from the repository root: {exc}")
    return [(endpoint, body) for _, endpoint, body, _ in EXAMPLES]


def _prose(size: int) -> str:
    sentence = ("The quarterly report shows revenue grew in every region, with the strongest "
                "gains in the north east, while churn stayed flat and margins improved.\n")
    return (sentence * (size // len(sentence) + 1))[:size]


def _code(size: int) -> str:
    block = ("def handler(event, context):\n    items = event.get('items', [])\n"
             "    return {'count': len(items)}\n\n")
    return (block * (size // len(block) + 1))[:size]


def _cases() -> dict[str, list[Case]]:
    def chat(*messages: dict[str, Any]) -> dict[str, Any]:
        return {"model": "gpt-4o", "messages": list(messages)}

    question = {"role": "user", "content": "What does the report say about churn?"}
    return {
        "examples": _examples(),
        "short": [(Endpoint.CHAT, chat({"role": "user", "content": "Hi! How are you?"}))],
        "20KB-user": [(Endpoint.CHAT, chat(
            {"role": "user", "content": _prose(20 * KB - 40) + "\nWhat does it say on churn?"}))],
        "20KB-system": [(Endpoint.CHAT, chat(
            {"role": "system", "content": _prose(20 * KB)}, question))],
        "20KB-code": [(Endpoint.CHAT, chat({"role": "user", "content": _code(20 * KB)}))],
    }


def _time(call: Callable[[int], object], n: int, iterations: int) -> list[int]:
    for i in range(WARMUP):
        call(i % n)
    samples = [0] * iterations
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(iterations):
        start = clock()
        call(i % n)
        samples[i] = clock() - start
    return samples


def _percentile(sorted_ns: Sequence[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def measure(cases: list[Case], classifier: Classifier,
            iterations: int) -> dict[str, tuple[float, float]]:
    """p50 and p99 (µs) of features_of, classify, and both, over ``cases`` in turn."""
    features: list[Features] = [features_of(e, b) for e, b in cases]
    runs: dict[str, Callable[[int], object]] = {
        "features": lambda i: features_of(*cases[i]),
        "classify": lambda i: classifier.classify(features[i]),
        "total": lambda i: classifier.classify(features_of(*cases[i])),
    }
    out = {}
    for name, call in runs.items():
        samples = sorted(_time(call, len(cases), iterations))
        out[name] = (_percentile(samples, 0.50), _percentile(samples, 0.99))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Time the classifier on each case and print a table of p50/p99 in microseconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    args = parser.parse_args(argv)
    classifier = Classifier(load_default_rules())
    print(f"# classifier cost, {args.iterations} calls per cell, python "
          f"{platform.python_version()} on {platform.machine()}")
    print(f"{'case':<12} {'requests':>8}  {'features p50/p99':>17}  "
          f"{'classify p50/p99':>17}  {'total p50/p99 (us)':>19}  tiers")
    for name, cases in _cases().items():
        result = measure(cases, classifier, args.iterations)
        tiers = sorted({classifier.classify(features_of(e, b))[0] for e, b in cases})
        cells = "  ".join(f"{p50:>8.2f}/{p99:<8.2f}" for p50, p99 in result.values())
        print(f"{name:<12} {len(cases):>8}  {cells}  {','.join(tiers)}")


if __name__ == "__main__":
    main()
