"""A model's non-weight files, checked before any work: they parse, and custom code is locatable.

A garbage `tokenizer.json` copied verbatim makes an output nothing can load, found only after
the whole merge ran; so every tokenizer, generation and processor file is parsed at open
(JSON; `tokenizer.json` through the `tokenizers` library, `tokenizer.model` through
sentencepiece, chat templates through jinja2, each when installed). Custom code named by an
`auto_map` is never imported or run: its files are only located (inside the model) so the
writer can carry them into the output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mksuite.common.errors import ModelFileError
from mksuite.common.loading.containment import CHAT_TEMPLATES_DIR, companion_files, contained, model_root

# What transformers follows when it loads remote code: `from .module import ...` lines.
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][\w.]*)\s+import", re.MULTILINE)
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def check_companions_parse(directory: Path) -> None:
    """ModelFileError (exit 4) naming the first tokenizer/generation/processor file that does not parse."""
    for file in companion_files(directory):
        if file.name == CHAT_TEMPLATES_DIR and file.is_dir():
            continue
        if not file.is_file():
            raise _bad(file, "is not a regular file")
        _check_file(file)


def _check_file(file: Path) -> None:
    name = file.name
    if name.endswith(".json"):
        value = _json(file)
        if not isinstance(value, dict) and name != "chat_template.json":
            raise _bad(file, f"holds a JSON {type(value).__name__}, not an object")
        if name == "tokenizer.json":
            _check_tokenizer_json(file)
    elif name == "tokenizer.model":
        _check_sentencepiece(file)
    elif name.endswith(".jinja"):
        _check_template(file, _text(file))
    elif name.endswith((".txt", ".tiktoken")):
        _text(file)


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except OSError as error:
        raise _bad(file, f"cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise _bad(file, f"is not UTF-8 text ({error})") from None


def _json(file: Path) -> object:
    try:
        return json.loads(_text(file))
    except json.JSONDecodeError as error:
        raise _bad(file, f"is not valid JSON ({error})") from None
    except RecursionError:
        raise _bad(file, "is JSON nested too deeply") from None


def _check_tokenizer_json(file: Path) -> None:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers comes with transformers
        return
    try:
        Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for every malformed file
        raise _bad(file, f"is not a tokenizer the `tokenizers` library can load ({error})") from None


def _check_sentencepiece(file: Path) -> None:
    try:
        import sentencepiece
    except ImportError:
        return
    try:
        sentencepiece.SentencePieceProcessor(model_proto=file.read_bytes())
    except OSError as error:
        raise _bad(file, f"cannot be read ({error.strerror or error})") from None
    except Exception as error:  # sentencepiece raises RuntimeError and others for a bad proto
        raise _bad(file, f"is not a sentencepiece model ({error})") from None


def _check_template(file: Path, text: str) -> None:
    try:
        import jinja2
    except ImportError:
        return
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise _bad(file, f"is not a valid Jinja chat template (line {error.lineno}: {error.message})") from None


def _bad(file: Path, what: str) -> ModelFileError:
    return ModelFileError(
        f"{file} {what}",
        path=str(file),
        hint="the file is damaged or not what its name says; download the model again or remove the file",
    )


def custom_code_files(directory: Path, config: dict, *, source: str = "config.json") -> list[str]:
    """The `.py` files (relative names) the ``auto_map`` of ``config`` needs, with their relative imports.

    Classes named `org/repo--module.Class` live in another repository: transformers fetches
    them from there, so nothing is needed here. Every file must exist inside the model
    (ModelFileError otherwise); nothing is imported or run.
    """
    auto_map = config.get("auto_map")
    if auto_map is None:
        return []
    if not isinstance(auto_map, dict):
        raise _bad(directory / source, f"has an `auto_map` that is not an object ({auto_map!r})")
    modules = []
    for key, value in auto_map.items():
        for reference in value if isinstance(value, list) else [value]:
            if reference is None or (isinstance(reference, str) and "--" in reference):
                continue
            if not isinstance(reference, str) or "." not in reference or not _MODULE.fullmatch(reference):
                raise _bad(directory / source, f"has auto_map.{key} = {reference!r}, not `module.ClassName`")
            modules.append(reference.rsplit(".", 1)[0])
    root = model_root(directory)
    needed: list[str] = []
    while modules:
        module = modules.pop(0)
        name = module.replace(".", "/") + ".py"
        if name in needed:
            continue
        file = directory / name
        if not file.is_file():
            raise ModelFileError(
                f"{directory / source} names custom code `{module}` (auto_map), but {file} does not exist",
                path=str(file),
                hint="download the model's .py files too, or remove auto_map to use a built-in class",
            )
        contained(root, file, what="custom code file")
        needed.append(name)
        modules += _RELATIVE_IMPORT.findall(_text(file))
    return needed


def check_custom_code(directory: Path, config: dict) -> None:
    """Refuse a model whose config or tokenizer config names custom code it does not hold."""
    custom_code_files(directory, config)
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = _json(tokenizer_config)
        if isinstance(value, dict):
            custom_code_files(directory, value, source="tokenizer_config.json")
