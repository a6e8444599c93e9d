"""OpenTelemetry traces and metrics, named per the GenAI semantic conventions.

The request path only decides trace ids and sampling and adds a
``traceparent`` upstream; spans are built from the recorded timings after the
response has been sent, and exported in the background by the SDK.
"""
