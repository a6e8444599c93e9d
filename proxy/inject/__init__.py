"""Kubernetes mutating admission webhook that injects the sidecar into agent pods.

``config`` reads the injector YAML the Helm chart renders, ``admission`` turns
an AdmissionReview into a JSONPatch (pure, no I/O) and ``server`` serves it
over HTTPS (``llm-sidecar inject-webhook``).
"""
