"""The non-weight files of an output model: config.json, tokenizer files, model card, recipe copy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mksuite.common.arch import set_config_value
from mksuite.common.dtypes import dtype_name
from mksuite.common.errors import ArchitectureError
from mksuite.common.loading.companions import custom_code_files
from mksuite.common.loading.containment import TAGALONG_FILES, TOKENIZER_FILES, contained, model_root


def write_config(
    directory: Path,
    config: dict,
    *,
    dtype: torch.dtype | None = None,
    updates: dict[str, object] | None = None,
    transform: Callable[[dict], dict] | None = None,
    code_from: Path | None = None,
) -> dict:
    """Write ``config.json``: the donor's config with only the given fields changed.

    Edited as JSON rather than through transformers so fields the installed transformers does
    not know survive untouched. ``updates`` keys may be dotted paths (``text_config.x``);
    ``transform`` (given a copy, returning the final dict) makes structural edits such as
    rebuilding per-layer lists. ``code_from``: the donor directory, whose custom code files
    (named by the written config's ``auto_map``) are copied along, never imported.
    """
    config = json.loads(json.dumps(config))  # deep copy; never mutate the donor's dict
    # Quantized inputs are dequantized when read (others are refused), so no output is quantized.
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            holder.pop("quantization_config", None)
    if dtype is not None:
        name = dtype_name(dtype)
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = name
    for key, value in (updates or {}).items():
        try:
            set_config_value(config, key, value)
        except TypeError as error:  # the donor's config has a non-object where the key needs one
            raise ArchitectureError(f"cannot set `{key}` in the donor's config.json: {error}") from None
    if transform is not None:
        config = transform(config)
    if code_from is not None:
        for name in custom_code_files(Path(code_from), config):
            _copy_nested(code_from, name, directory)
    with open(Path(directory) / "config.json", "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return config


def copy_tokenizer_files(donor: Path, directory: Path) -> list[str]:
    """Copy the donor's tokenizer (and tagalong) files that exist; returns the names copied."""
    copied = []
    names = [*TOKENIZER_FILES, *TAGALONG_FILES, *(p.name for p in sorted(Path(donor).glob("*.tiktoken")))]
    for name in names:
        if copy_model_file(donor, name, directory):
            copied.append(name)
    if "tokenizer_config.json" in copied:  # a custom tokenizer class needs its code next to it
        tokenizer_config = json.loads((Path(directory) / "tokenizer_config.json").read_text(encoding="utf-8"))
        for name in custom_code_files(Path(donor), tokenizer_config, source="tokenizer_config.json"):
            _copy_nested(donor, name, directory)
            copied.append(name)
    return copied


def _copy_nested(donor: Path, name: str, directory: Path) -> None:
    """Copy a custom code file, possibly in a package folder (`pkg/module.py`)."""
    (Path(directory) / name).parent.mkdir(parents=True, exist_ok=True)
    copy_model_file(donor, name, directory)


def copy_model_file(donor: Path, name: str, directory: Path) -> bool:
    """Copy ``donor/name`` into ``directory`` if it exists; never from outside the donor's root.

    Inputs were checked when opened; checking again here keeps a file swapped for a symlink
    in the meantime (or a donor that did not come through open_model) out of the output.
    """
    source = Path(donor) / name
    if not source.is_file():
        return False
    resolved = contained(model_root(donor), source, what="file")
    shutil.copyfile(resolved, Path(directory) / name)
    return True


def looks_like_hub_id(reference: str) -> bool:
    """Whether a model path reads as a Hub repo id (for links in the model card)."""
    if reference.startswith(("/", "~", ".")) or reference.count("/") > 1:
        return False
    return not Path(reference).exists()


def _model_link(reference: str) -> str:
    return f"[{reference}](https://huggingface.co/{reference})" if looks_like_hub_id(reference) else reference


def write_model_card(
    directory: Path,
    *,
    title: str,
    tool: str,
    method_name: str,
    method_url: str | None,
    base_model: str | None,
    models: Sequence[str],
    recipe_text: str,
    base_listed_with_models: bool = False,
) -> None:
    """Write README.md: front matter for the Hub, what was merged and how, and the recipe."""
    hub_ids = [m for m in ([base_model] if base_model else []) + list(models) if looks_like_hub_id(m)]
    lines = ["---"]
    if hub_ids:
        lines.append("base_model:")
        lines += [f"- {m}" for m in dict.fromkeys(hub_ids)]
    lines += ["library_name: transformers", "tags:", "- mergekit", "- merge", f"- {tool}", "---", f"# {title}", ""]
    lines.append(f"This model was built with mksuite's `{tool}` (version {_version()}).")
    lines.append("")
    method = f"[{method_name}]({method_url})" if method_url else method_name
    sentence = f"It was merged using the {method} merge method"
    others = list(models)
    if base_model and not base_listed_with_models:
        sentence += f", using {_model_link(base_model)} as a base"
    elif base_model:
        others = [base_model] + [m for m in others if m != base_model]
    lines += [sentence + ".", ""]
    if others:
        lines += ["The following models were included:", ""]
        lines += [f"* {_model_link(m)}" for m in dict.fromkeys(others)]
        lines.append("")
    commits = hub_commit_lines([*([base_model] if base_model else []), *models])
    if commits:
        lines += ["Hub models were read at these commits:", "", *commits, ""]
    lines += ["## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    (Path(directory) / "README.md").write_text("\n".join(lines))


def hub_commit_lines(references: Sequence[str]) -> list[str]:
    """One line per Hub model (or adapter) of ``references`` naming the commit it was read at."""
    from mksuite.common.errors import MkError
    from mksuite.common.loading.hub import hub_commit
    from mksuite.common.loading.reference import ModelReference

    lines = []
    for text in dict.fromkeys(references):
        try:
            ref = ModelReference.parse(text)
        except MkError:
            continue
        for part in (ref, ref.lora):
            sha = hub_commit(part.path, part.revision) if part is not None else None
            if sha is not None:
                lines.append(f"* `{ModelReference(part.path, part.revision)}`: commit `{sha}`")
    return list(dict.fromkeys(lines))


def _version() -> str:
    """The installed mksuite's version (the card says which tool built the model)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mksuite")
    except PackageNotFoundError:
        return "unknown"
