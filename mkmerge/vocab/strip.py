"""Remove a tokenizer's entries at ids ≥ the model's vocabulary size (docs/vocabulary.md).

Only fast BPE tokenizers can be stripped: their vocabulary, merges and added tokens are plain
data in ``tokenizer.json``. The tokenizer is saved, those files are edited, and it is loaded
back, so its class and settings (special tokens, chat template, lengths) are kept.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mksuite.common.errors import MergeError

# tokenizer_config.json keys naming one special token each.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPECIAL_TOKEN_LISTS = ("additional_special_tokens", "extra_special_tokens")


def strip_tokenizer(tokenizer, limit: int | None, *, model: str):
    """``tokenizer`` without the entries at ids ≥ ``limit`` (``tokenizer`` itself if there are none).

    ``model`` names the model in messages. MergeError when the tokenizer cannot be stripped.
    """
    if limit is None:
        return tokenizer
    removed = {token for token, index in tokenizer.get_vocab().items() if index >= limit}
    if not removed:
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else None
    if data is None or data.get("model", {}).get("type") != "BPE":
        kind = "a slow tokenizer" if data is None else f"a {data.get('model', {}).get('type')} tokenizer"
        raise MergeError(
            f"the tokenizer of {model} has {len(removed)} entries at ids ≥ its vocab_size {limit}, which must be "
            f"stripped for this tokenizer source, but it is {kind}; only fast BPE tokenizers can be stripped",
            hint="use `tokenizer: {source: <that model>}` to take a tokenizer as it is",
        )
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        _rewrite_json(Path(scratch) / "tokenizer.json", lambda data: _strip_tokenizer_json(data, limit))
        unset: dict[str, str] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            _rewrite_json(Path(scratch) / name, lambda config: _strip_special_tokens(config, removed, unset))
        from transformers import AutoTokenizer  # slow to import: only when a tokenizer is stripped

        stripped = AutoTokenizer.from_pretrained(scratch)
    if unset:
        listing = ", ".join(f"{key} {token!r}" for key, token in unset.items())
        warnings.warn(
            f"the tokenizer of {model} names special tokens beyond its vocab_size; unset: {listing}", stacklevel=2
        )
    left = [token for token, index in stripped.get_vocab().items() if index >= limit]
    if left:
        raise MergeError(
            f"stripping the tokenizer of {model} to {limit} ids left {len(left)} tokens above it ({left[:5]})",
            hint="its tokenizer class re-adds them on load; use a model reference as the tokenizer source",
        )
    return stripped


def _rewrite_json(path: Path, edit) -> None:
    if path.is_file():
        path.write_text(json.dumps(edit(json.loads(path.read_text())), ensure_ascii=False))


def _strip_tokenizer_json(data: dict, limit: int) -> dict:
    """Drop vocabulary entries and added tokens at ids ≥ limit, and merges that need them."""
    model = data["model"]
    vocab = {token: index for token, index in model["vocab"].items() if index < limit}
    prefix = model.get("continuing_subword_prefix") or ""
    kept = []
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        # tokenizers forms a merge's result like this and refuses merges whose result is unknown.
        merged = left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right)
        if left in vocab and right in vocab and merged in vocab:
            kept.append(merge)
    model["vocab"], model["merges"] = vocab, kept
    data["added_tokens"] = [token for token in data.get("added_tokens", []) if token["id"] < limit]
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return None


def _strip_special_tokens(config: dict, removed: set[str], unset: dict[str, str]) -> dict:
    """Unset special-token settings that name removed tokens (else loading would re-add them).

    Records each unset setting in ``unset`` (key -> token).
    """
    for key in SPECIAL_TOKEN_KEYS:
        token = _token_content(config.get(key))
        if token in removed:
            unset[key] = token
            config[key] = None
    for key in SPECIAL_TOKEN_LISTS:
        value = config.get(key)
        if isinstance(value, list):
            config[key] = [v for v in value if _token_content(v) not in removed]
        elif isinstance(value, dict):
            config[key] = {k: v for k, v in value.items() if _token_content(v) not in removed}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if _token_content(v) not in removed}
    return config
