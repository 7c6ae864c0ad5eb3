"""Prompt encoding for gate vectors (docs/moe.md): BOS string prefix, no special tokens, left padding.

Padding is done here, on token id lists, so the base tokenizer is only ever read: the
tokenizer saved with the output is a plain copy of the base's files, untouched by the
padding side or pad token used for prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mksuite.common.errors import ModelFileError, RecipeError


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded token ids of several prompts and their attention mask (1 = real token)."""

    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each prompt's first real token, as transformers does when generating."""
        positions = self.attention_mask.cumsum(-1) - 1
        return positions.masked_fill(self.attention_mask == 0, 1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def load_tokenizer(path: Path):
    """The base model's tokenizer, for encoding prompts."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises OSError, ValueError, ... for missing files
        raise ModelFileError(
            f"cannot load the base model's tokenizer from {path}: {error}",
            hint="prompt-based gate modes need the base model's tokenizer files; or use gate_mode: random",
        ) from None


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """One prompt's ids: the BOS *string* prepended, then tokenised without special tokens."""
    text = (tokenizer.bos_token or "") + prompt
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def padding_id(tokenizer) -> int:
    """Pad with BOS, else EOS (mergekit's choice; padded positions are masked out anyway)."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_prompts(tokenizer, prompts: Sequence[str]) -> PromptBatch:
    """Encode and left-pad ``prompts`` into one batch."""
    encoded = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise RecipeError(
                f"prompt {prompt!r} encodes to no tokens (and the tokenizer has no BOS token)",
                hint="remove empty prompts",
            )
    width = max(len(ids) for ids in encoded)
    pad = padding_id(tokenizer)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return PromptBatch(input_ids, attention_mask)
