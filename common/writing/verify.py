"""``--verify``: re-read a written output and check it is what the run meant to write.

Checked, in the partial directory before it is moved into place (so a failed check leaves
nothing at OUT): each weight file's size and header equal the plan's, the index equals the
planned one, every tensor's bytes have the crc32 computed while writing them, no stray
weight file is present, ``config.json`` and the tokenizer load with transformers (without
weights, without running custom code), and the model card names every input model.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from mksuite.common.errors import VerifyError
from mksuite.common.writing.journal import Checksums
from mksuite.common.writing.safetensors_writer import INDEX_FILE, ShardPlan, file_crc32, index_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
CARD_FILES = ("README.md", "mergekit_config.yml", "mergekit_moe_config.yml")


def verify_output(
    directory: Path, plans: Sequence[ShardPlan], checksums: Mapping[str, Checksums], card_names: Sequence[str] = ()
) -> str:
    """Check the output in ``directory``; the one-line summary, or VerifyError naming the first fault."""
    directory = Path(directory)
    tensors = _check_weights(directory, plans, checksums)
    loaded = _check_config_and_tokenizer(directory)
    card = _check_card(directory, card_names)
    size = sum(plan.file_bytes for plan in plans)
    return (
        f"verified: {len(plans)} weight file{'s' if len(plans) != 1 else ''}, {tensors} tensors "
        f"({size / 1e6:.1f} MB) match their checksums; {loaded}; {card}"
    )


def _check_weights(directory: Path, plans: Sequence[ShardPlan], checksums: Mapping[str, Checksums]) -> int:
    planned = {plan.filename for plan in plans}
    stray = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in planned)
    if stray:
        raise VerifyError(f"{directory} holds weight files the plan does not: {', '.join(stray)}")
    count = 0
    for plan in plans:
        path = directory / plan.filename
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise VerifyError(f"cannot read {path}: {error.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != plan.file_bytes:
                raise VerifyError(f"{path} is {size} bytes, the plan says {plan.file_bytes}")
            if os.pread(fd, len(plan.header), 0) != plan.header:
                raise VerifyError(f"the header of {path} differs from the planned one")
            for tensor, offset in zip(plan.tensors, plan.offsets):
                _check_tensor(fd, path, tensor, len(plan.header) + offset, checksums.get(tensor.name))
                count += 1
        finally:
            os.close(fd)
    if len(plans) > 1:
        try:
            index = json.loads((directory / INDEX_FILE).read_text())
        except (OSError, ValueError) as error:
            raise VerifyError(f"cannot read {directory / INDEX_FILE}: {error}") from None
        expected = index_json(plans)
        if index.get("weight_map") != expected["weight_map"] or index.get("metadata") != expected["metadata"]:
            raise VerifyError(f"{directory / INDEX_FILE} differs from the planned index")
    return count


def _check_tensor(fd: int, path: Path, tensor, start: int, parts: Checksums | None) -> None:
    if parts is None:
        raise VerifyError(f"no checksum was recorded for tensor `{tensor.name}` while writing it")
    total_rows = tensor.shape[0] if tensor.shape else 1
    row_bytes = tensor.nbytes // total_rows if total_rows else 0
    covered = 0
    for first, stop, crc in sorted(parts):
        got = file_crc32(fd, start + first * row_bytes, (stop - first) * row_bytes)
        if got != crc:
            where = "" if (first, stop) == (0, total_rows) else f" rows [{first}, {stop})"
            raise VerifyError(
                f"tensor `{tensor.name}`{where} in {path.name} reads back with crc32 {got:08x}, "
                f"but {crc:08x} was written",
                hint="the disk or file system changed the bytes after they were written; check the device",
            )
        covered += stop - first
    if covered != total_rows:
        raise VerifyError(f"checksums of tensor `{tensor.name}` cover {covered} of {total_rows} rows")


def _check_config_and_tokenizer(directory: Path) -> str:
    import transformers

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise VerifyError(f"config.json of the output does not parse: {error}") from None
    if not isinstance(config, dict):
        raise VerifyError("config.json of the output is not a JSON object")
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "auto_map" in config:
            said.append("config.json parses (custom code: not loaded)")
        else:
            try:
                transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
            except Exception as error:  # any failure to load is the finding
                raise VerifyError(f"transformers cannot load the output's config.json: {error}") from None
            said.append("config loads")
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            try:
                transformers.AutoTokenizer.from_pretrained(
                    str(directory), local_files_only=True, trust_remote_code=False
                )
            except Exception as error:
                raise VerifyError(f"transformers cannot load the output's tokenizer: {error}") from None
            said.append("tokenizer loads")
        else:
            said.append("no tokenizer")
    return ", ".join(said)


def _check_card(directory: Path, names: Sequence[str]) -> str:
    cards = [directory / name for name in CARD_FILES if (directory / name).is_file()]
    if not cards:
        return "no model card"
    text = "\n".join(card.read_text(errors="replace") for card in cards)
    missing = [name for name in names if name not in text]
    if missing:
        raise VerifyError(f"the model card ({cards[0].name}) does not name the input {missing[0]}")
    return f"the card names all {len(names)} inputs"
