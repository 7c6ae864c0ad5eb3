"""Vocabularies and chat templates for `mkmerge` (docs/vocabulary.md): the output tokenizer, embeddings
rebuilt for it before merging, and the tokenizer files written with the model.

``plan`` builds the tokenizer and plans per-model row sources (``rows``, pure) applied by the
``AlignVocabulary`` task (``align``); ``build`` and ``strip`` make tokenizers; ``output`` writes them.
"""

from mkmerge.vocab.align import AlignVocabulary
from mkmerge.vocab.build import TokenizerCache
from mkmerge.vocab.output import write_tokenizer
from mkmerge.vocab.plan import (
    EmbeddingInput,
    OutputVocabulary,
    config_vocab_size,
    plan_vocabulary,
    resolve_chat_template,
    vocab_size_key,
    written_vocab_size,
)

__all__ = [
    "AlignVocabulary",
    "EmbeddingInput",
    "OutputVocabulary",
    "TokenizerCache",
    "config_vocab_size",
    "plan_vocabulary",
    "resolve_chat_template",
    "vocab_size_key",
    "write_tokenizer",
    "written_vocab_size",
]
