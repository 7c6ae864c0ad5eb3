"""Tiny models with differing vocabularies, for the tokenizer tests and the example recipes."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken


def with_added_tokens(src: Path | str, dst: Path | str, tokens: list[str], *, seed: int, special: bool = True) -> Path:
    """A copy of the model at ``src`` whose tokenizer gains ``tokens``, each with its own new row.

    The rows of the new ids (in the input embedding and, when untied, the LM head) are seeded
    random values, as if they had been trained; the matrices grow when the ids pass their end.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(
        [AddedToken(t, special=special, normalized=not special) for t in tokens], special_tokens=special
    )
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    matrices = {id(m.weight): m.weight for m in modules if m is not None}  # a tied head is the same matrix
    with torch.no_grad():
        for matrix in matrices.values():
            for index in ids:
                matrix[index] = torch.randn(matrix.shape[1], generator=generator) * matrix.std()
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return Path(dst)
