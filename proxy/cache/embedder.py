"""Embedders for the semantic tier: text in, unit-length float32 vector out.

The default is a static embedding model: one vector per WordPiece token,
distilled from all-MiniLM-L6-v2 with model2vec (``loadtest/distill_embedder.py``)
and shipped as package data (``data/minilm-static``). A prompt's vector is
the mean of its tokens' vectors, normalised, which takes numpy and the
``tokenizers`` library only: tens of microseconds, no model runtime, no
download. It is loaded once, when the app starts.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

Vector = npt.NDArray[np.float32]

DEFAULT_MODEL = "minilm-static"


class Embedder(Protocol):
    """What the semantic tier needs of an embedding model."""

    name: str
    dims: int

    def embed(self, text: str) -> Vector:
        """The unit-length vector of ``text`` (all zeros if it has no known token)."""
        ...


class StaticEmbedder:
    """Mean of per-token vectors (model2vec-style), from a directory of files.

    The directory holds ``tokenizer.json``, ``vectors.npy`` (int8, one row
    per token id), ``scales.npy`` (float32, one per row: row = int8 * scale)
    and ``meta.json``.
    """

    def __init__(self, directory: Path) -> None:
        self.meta = json.loads((directory / "meta.json").read_text("utf-8"))
        self.name = directory.name
        encode = self.meta.get("encode", {})
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        quantized = np.load(directory / "vectors.npy")
        scales = np.load(directory / "scales.npy").astype(np.float32)
        # Dequantised once: 30k x 256 float32 is 31 MB, and each lookup then
        # gathers rows without converting them.
        self._table: Vector = (quantized.astype(np.float32) * scales[:, None]).astype(
            np.float32)
        self.dims = int(self._table.shape[1])
        # As model2vec's StaticModel.encode: cut the text, then the tokens, drop [UNK].
        self.max_chars = int(encode.get("max_chars", 3072))
        self.max_tokens = int(encode.get("max_tokens", 512))
        self._skip = np.array(sorted(int(i) for i in encode.get("drop_token_ids", ())),
                              dtype=np.int64)

    @classmethod
    def packaged(cls, name: str = DEFAULT_MODEL) -> StaticEmbedder:
        """The model shipped in the package under ``data/<name>``."""
        root = resources.files("proxy.cache").joinpath("data", name)
        with resources.as_file(root) as path:
            return cls(Path(path))

    def token_ids(self, text: str) -> npt.NDArray[np.int64]:
        """The token ids the vector is the mean of."""
        text = text[: self.max_chars]
        ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids,
                         dtype=np.int64)[: self.max_tokens]
        if self._skip.size:
            ids = ids[~np.isin(ids, self._skip)]
        return ids

    def embed(self, text: str) -> Vector:
        """See :class:`Embedder`."""
        ids = self.token_ids(text)
        if ids.size == 0:
            return np.zeros(self.dims, dtype=np.float32)
        vector: Vector = self._table[ids].mean(axis=0)
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector /= norm
        return vector
