"""Load the input models' tokenizers and build the output tokenizer (docs/vocabulary.md)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mkmerge.vocab.strip import strip_tokenizer
from mksuite.common.errors import ModelFileError
from mksuite.common.loading.companions import check_companions_parse
from mksuite.common.loading.containment import check_companions_contained

if TYPE_CHECKING:  # transformers and tokenizers take ~1.3 s to import: only runs that build tokenizers pay
    from tokenizers import AddedToken

# AddedToken settings that make two definitions of one added token differ.
ADDED_TOKEN_SETTINGS = ("special", "single_word", "lstrip", "rstrip", "normalized")


def load_tokenizer(path: Path, *, model: str):
    """The tokenizer stored with a model; ModelFileError (exit 4) naming the model when there is none."""
    # A tokenizer source need not be an input model, so it may not have been checked at open.
    check_companions_contained(Path(path))
    check_companions_parse(Path(path))
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for unusable files
        raise ModelFileError(
            f"cannot load the tokenizer of {model} from {path}: {error}",
            hint="the tokenizer source needs tokenizer files (tokenizer.json or tokenizer.model) next to the weights",
        ) from None


class TokenizerCache:
    """Each model's tokenizer, loaded once per plan.

    An optional tokenizer that fails to load is None, warned about once: docs/vocabulary.md assumes such
    a model shares the base vocabulary. Callers that modify a tokenizer take a :meth:`copy`.
    """

    def __init__(self) -> None:
        self._loaded: dict[Path, object | None] = {}

    def get(self, path: Path, *, model: str, required: bool = False):
        if path not in self._loaded or (required and self._loaded[path] is None):
            try:
                self._loaded[path] = load_tokenizer(path, model=model)
            except ModelFileError as error:
                if required:
                    raise
                warnings.warn(
                    f"{error.message}; taking it to share the base model's vocabulary, without a chat template",
                    stacklevel=2,
                )
                self._loaded[path] = None
        return self._loaded[path]

    def copy(self, path: Path, *, model: str):
        """A private copy of a model's tokenizer (ModelFileError if it has none)."""
        return copy.deepcopy(self.get(path, model=model, required=True))


def vocabulary_below(vocab: Mapping[str, int], limit: int | None) -> dict[str, int]:
    """The entries of a token -> id map with ids below ``limit`` (the model has no row for the rest)."""
    if limit is None:
        return dict(vocab)
    return {token: index for token, index in vocab.items() if index < limit}


@dataclass(frozen=True)
class TokenizerInput:
    """One referenced model's tokenizer for the union walk (None when it failed to load)."""

    model: str
    tokenizer: object | None
    limit: int | None


def union_tokenizer(base, base_limit: int | None, inputs: Sequence[TokenizerInput], *, base_model: str):
    """The stripped base tokenizer plus every token of ``inputs`` it lacks, in encounter order.

    Ordinary tokens become ordinary added tokens (docs/vocabulary.md: they are matched before the
    base's own segmentation); added and special tokens keep their settings, the first
    definition winning over later, different ones (warned).
    """
    output = strip_tokenizer(base, base_limit, model=base_model)
    known = set(output.get_vocab())
    defined = {token.content: token for token in output.added_tokens_decoder.values()}
    new: list[AddedToken | str] = []
    for entry in inputs:
        if entry.tokenizer is None:
            continue  # assumed to share the base vocabulary
        added = entry.tokenizer.added_tokens_decoder
        for token, index in sorted(
            vocabulary_below(entry.tokenizer.get_vocab(), entry.limit).items(), key=lambda kv: kv[1]
        ):
            definition = added.get(index)
            if token in known:
                if definition is not None and token in defined:
                    _warn_if_redefined(defined[token], definition, entry.model)
                continue
            known.add(token)
            if definition is None:
                new.append(token)
            else:
                copy = _copy_added_token(definition)
                defined[token] = copy
                new.append(copy)
    _append_tokens(output, new)
    return output


def add_missing_tokens(tokenizer, tokens: Iterable[str]) -> None:
    """Append each of ``tokens`` the tokenizer lacks as an ordinary added token (``tokenizer.tokens`` keys)."""
    known = tokenizer.get_vocab()
    _append_tokens(tokenizer, [token for token in dict.fromkeys(tokens) if token not in known])


def _append_tokens(tokenizer, tokens: list[AddedToken | str]) -> None:
    if tokens:
        tokenizer.add_tokens(tokens)  # one call: ids follow the existing vocabulary in list order


def _copy_added_token(token: AddedToken) -> AddedToken:
    from tokenizers import AddedToken

    return AddedToken(token.content, **{setting: getattr(token, setting) for setting in ADDED_TOKEN_SETTINGS})


def _warn_if_redefined(first: AddedToken, later: AddedToken, model: str) -> None:
    differences = [
        f"{setting}={getattr(later, setting)}"
        for setting in ADDED_TOKEN_SETTINGS
        if getattr(first, setting) != getattr(later, setting)
    ]
    if differences:
        warnings.warn(
            f"{model} defines added token {first.content!r} differently ({', '.join(differences)}); "
            "keeping the first definition",
            stacklevel=3,
        )
