"""Load-testing helpers for llm-sidecar: a fast, deterministic mock OpenAI upstream."""
