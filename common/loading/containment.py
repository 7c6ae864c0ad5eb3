"""Every file read or copied from a model must lie inside that model's root.

Outputs are uploaded publicly, so a `tokenizer.json` that is a symlink to `~/.ssh/id_rsa`, or
an index naming `../../elsewhere/x.safetensors`, must never be followed. The root is the
model directory itself (symlinks resolved), except for a Hub cache snapshot
(`models--org--name/snapshots/<rev>/`), whose files are symlinks into the repository's
`blobs/`: there the root is the repository's cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from mksuite.common.errors import ModelFileError

# Non-weight files the tools read or copy from a model directory (tokenizer, generation
# defaults, processor files for multimodal models).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TAGALONG_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
# A folder transformers reads extra named chat templates from.
CHAT_TEMPLATES_DIR = "additional_chat_templates"


def model_root(directory: str | os.PathLike) -> Path:
    """The folder every file of the model in ``directory`` must resolve inside."""
    resolved = Path(directory).resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent
    return resolved


def contained(root: Path, file: str | os.PathLike, *, what: str = "file") -> Path:
    """``file`` with symlinks resolved; ModelFileError (exit 4) when it lies outside ``root``."""
    file = Path(file)
    try:
        resolved = file.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise ModelFileError(f"cannot resolve {what} {file}: {error}", path=str(file)) from None
    if not resolved.is_relative_to(root):
        raise ModelFileError(
            f"{what} {file} resolves to {resolved}, outside the model's folder {root}",
            path=str(file),
            hint="files are only read from inside the model directory; copy the file in instead of linking it",
        )
    return resolved


def companion_files(directory: Path) -> list[Path]:
    """The tokenizer and tagalong files present in ``directory`` (dangling symlinks included)."""
    names = [*TOKENIZER_FILES, *TAGALONG_FILES]
    found = [directory / name for name in names if os.path.lexists(directory / name)]
    found += sorted(directory.glob("*.tiktoken"))
    templates = directory / CHAT_TEMPLATES_DIR
    if os.path.lexists(templates):
        found.append(templates)
        if templates.is_dir():
            found += sorted(templates.iterdir())
    return found


def check_companions_contained(directory: Path, root: Path | None = None) -> None:
    """Refuse a model whose tokenizer or tagalong files lead outside its root."""
    root = root or model_root(directory)
    for file in companion_files(directory):
        contained(root, file, what="tokenizer file" if file.name in TOKENIZER_FILES else "file")
