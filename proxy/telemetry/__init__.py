"""OpenTelemetry traces and metrics, named per the GenAI semantic conventions.

The request path only decides trace ids and sampling and adds a
``traceparent`` upstream; spans and metrics are built from the recorded
timings after the response has been sent, on the settle worker, and exported
in the background from the event loop (gRPC and console through the SDK).
"""
