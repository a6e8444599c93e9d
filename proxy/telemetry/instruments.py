"""The sidecar's metric instruments: GenAI semantic conventions plus ``llm_sidecar.*``.

Every label has a small, bounded set of values: no keys, tenants, prompts or
request ids. Model names come from clients, so only the first
``MAX_MODELS`` distinct ones become label values; later ones are ``_other``.
The README's metrics table documents each instrument and its labels.
"""

from __future__ import annotations

from opentelemetry.metrics import Meter

MAX_MODELS = 100
OTHER = "_other"

# Bucket boundaries recommended by the GenAI semantic conventions.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576,
                  4194304, 16777216, 67108864)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                     20.48, 40.96, 81.92)
# The sidecar's own cost is sub-millisecond: buckets to match.
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                     0.025, 0.05, 0.1)

Labels = dict[str, str | int]


class Instruments:
    """Creates the instruments once; records one request's measurements."""

    def __init__(self, meter: Meter) -> None:
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per request, by gen_ai.token.type (input/output).",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Time from the request's arrival to the end of its answer.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self.time_to_first_chunk = meter.create_histogram(
            "llm_sidecar.time_to_first_chunk", unit="s",
            description="Streams: time from the request's arrival to its first chunk.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self.requests = meter.create_counter(
            "llm_sidecar.requests", unit="{request}",
            description="Requests answered, by operation and HTTP status.")
        self.passthrough_requests = meter.create_counter(
            "llm_sidecar.passthrough.requests", unit="{request}",
            description="Requests relayed untouched (files, models, ...), by method and status.")
        self.upstream_errors = meter.create_counter(
            "llm_sidecar.upstream.errors", unit="{error}",
            description="Upstream exchanges that failed in the sidecar (no upstream answer).")
        self.overhead = meter.create_histogram(
            "llm_sidecar.overhead", unit="s",
            description="Time spent in the sidecar per request, upstream excluded.",
            explicit_bucket_boundaries_advisory=_OVERHEAD_BUCKETS)
        self._models: dict[str, str] = {}

    def passthrough_done(self, method: str, status: int, failure: str | None) -> None:
        """Count a finished pass-through request (an observer for Passthrough)."""
        self.passthrough_requests.add(1, {"http.request.method": method[:16],
                                          "http.response.status_code": status})
        if failure is not None:
            self.upstream_errors.add(1, {"error.type": failure})

    def model_label(self, model: str | None) -> str:
        """A bounded label value for a client-supplied model name."""
        if not model:
            return ""
        label = self._models.get(model)
        if label is None:
            if len(self._models) >= MAX_MODELS:
                return OTHER
            label = self._models[model] = model[:64]
        return label
