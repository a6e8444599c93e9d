"""The OpenAI wire format: canonical requests, SSE, usage, error bodies, header rules."""
