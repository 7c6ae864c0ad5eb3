"""Write the output model's tokenizer files (docs/outputs.md)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from mkmerge.vocab.build import load_tokenizer
from mksuite.common.errors import ModelFileError
from mksuite.common.writing import copy_tokenizer_files
from mksuite.common.writing.model_files import TAGALONG_FILES, copy_model_file

# Files that belong next to a tokenizer but are not written by its save_pretrained.
COMPANION_FILES = ("generation_config.json", *TAGALONG_FILES)


def write_tokenizer(directory: Path, *, built, donor: Path, chat_template: str | None, copy_files: bool) -> None:
    """The built tokenizer, else the donor's (re-serialised when a chat template must be set).

    A built tokenizer is always written: the embedding rows follow its ids, so the weights
    are unusable without it. A donor tokenizer is written only with ``copy_files``
    (``--copy-tokenizer``); a chat template without either is dropped with a warning.
    """
    if built is not None:
        _save(built, directory, chat_template)
        _copy_companions(donor, directory)
    elif not copy_files:
        if chat_template is not None:
            warnings.warn("--no-copy-tokenizer: no tokenizer is written, so the chat template is dropped", stacklevel=2)
    elif chat_template is None:
        copy_tokenizer_files(donor, directory)
    else:
        try:
            tokenizer = load_tokenizer(donor, model=str(donor))
        except ModelFileError as error:
            warnings.warn(f"{error.message}; copying its tokenizer files without the chat template", stacklevel=2)
            copy_tokenizer_files(donor, directory)
            return
        _save(tokenizer, directory, chat_template)
        _copy_companions(donor, directory)


def _save(tokenizer, directory: Path, chat_template: str | None) -> None:
    if chat_template is not None:
        tokenizer = copy.deepcopy(tokenizer)  # the plan's tokenizer stays as planned
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(directory))


def _copy_companions(donor: Path, directory: Path) -> None:
    for name in COMPANION_FILES:
        copy_model_file(donor, name, directory)
