"""llm-sidecar: a transparent OpenAI-compatible sidecar proxy."""

__version__ = "0.1.0"
