"""The options every tool shares, declared once as one dataclass.

Each field of :class:`SharedOptions` is a command-line option (its ``Annotated`` type carries
the Typer declaration); :func:`shared_options` adds them to a command's signature and hands
the command one ``SharedOptions`` value. Adding an option to all three tools is one line
here (a field); a command leaves out the ones it has no use for with ``exclude=``.

Nothing here imports torch: ``--help``, ``--version`` and recipe errors stay fast. The
torch-dependent conversions (:meth:`SharedOptions.build`, :func:`parse_float_dtype`) import
it when called.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from mksuite.common.dtype_names import FLOAT_DTYPE_NAMES
from mksuite.common.errors import DeviceUnavailableError, RecipeError, did_you_mean

# Help sections (Typer's rich_help_panel, which our plain help formatter groups by too).
RUN, MODELS, OUTPUT = "Run options", "Model options", "Output options"
DISPLAY, MERGEKIT = "Display options", "mergekit options (accepted so pasted command lines work)"


def _option(*names: str, help: str, panel: str, **kw) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=kw.pop("show_default", False), **kw)


def _flag(names: str, help: str, panel: str = MERGEKIT, *more: str) -> typer.models.OptionInfo:
    return _option(names, *more, help=help, panel=panel)


# -- aliases a tool uses for its own arguments -----------------------------------------------
OutPath = Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (appears only when the run succeeds).")]
RecipePath = Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML (mergekit format).")]


@dataclass(frozen=True)
class SharedOptions:
    """Options of mkmerge, mkstack and mkmoe (and mergekit-yaml / mergekit-moe flags they accept)."""

    device: Annotated[
        str,
        _option("--device", metavar="DEVICE", help="Where the math runs: cpu, cuda, cuda:N or auto.", panel=RUN),
    ] = "cpu"
    cuda: Annotated[bool, _flag("--cuda/--no-cuda", "Same as --device cuda.", RUN)] = False
    threads: Annotated[
        int | None,
        _option("--threads", "-j", "--num-threads", metavar="N", help="CPU threads for tensor math.", panel=RUN),
    ] = None
    seed: Annotated[
        int, _option("--seed", "--random-seed", metavar="N", help="Seed for random methods (default 0).", panel=RUN)
    ] = 0
    shard_size: Annotated[
        str,
        _option(
            "--shard-size",
            "--out-shard-size",
            metavar="SIZE",
            help="Largest output shard in bytes: k/M/G (x1000) or KiB/MiB/GiB (default 5G).",
            panel=RUN,
        ),
    ] = "5G"
    precise: Annotated[
        bool,
        _flag(
            "--precise",
            "More accurate arithmetic where mergekit rounds to the merge dtype (ties/dare rescale, "
            "slerp, arcee_fusion, mkmoe hidden gates); default: mergekit's numbers.",
            RUN,
        ),
    ] = False
    allow_crimes: Annotated[
        bool, _flag("--allow-crimes/--no-allow-crimes", "Allow inputs of different architectures.", MODELS)
    ] = False
    cache_dir: Annotated[
        str | None,
        _option(
            "--cache-dir", "--transformers-cache", metavar="DIR", help="Hugging Face cache directory.", panel=MODELS
        ),
    ] = None
    lora_merge_dtype: Annotated[
        str | None,
        _option(
            "--lora-merge-dtype",
            metavar="DTYPE",
            help="The dtype of model+lora inputs once the adapter is applied (float32, float16, bfloat16; "
            "default: as stored). The update itself is computed in float32.",
            panel=MODELS,
        ),
    ] = None
    unsafe_truncate_embeddings: Annotated[
        bool,
        _flag(
            "--unsafe-truncate-embeddings",
            "Models of different vocabulary sizes and no tokenizer settings: cut every embedding to the "
            "smallest vocabulary instead of refusing (assumes shared token ids).",
            MODELS,
        ),
    ] = False
    overwrite: Annotated[
        bool, _flag("--overwrite", "Replace OUT if it already exists (only a model directory is replaced).", OUTPUT)
    ] = False
    verify: Annotated[
        bool,
        _flag("--verify", "Re-read the output before moving it into place: headers, checksums, config, card.", OUTPUT),
    ] = False
    copy_tokenizer: Annotated[
        bool, _flag("--copy-tokenizer/--no-copy-tokenizer", "Copy the donor's tokenizer files (default on).", OUTPUT)
    ] = True
    write_model_card: Annotated[
        bool,
        _flag("--write-model-card/--no-write-model-card", "Write README.md and the recipe copy (default on).", OUTPUT),
    ] = True
    dry_run: Annotated[
        bool, _flag("--dry-run", "Print the plan and stop: no tensor is read, OUT is not created.", OUTPUT)
    ] = False
    as_json: Annotated[bool, _flag("--json", "Print the plan as JSON (with --dry-run).", OUTPUT)] = False
    # -- Hub upload (docs: README "The Hugging Face Hub"); push_output() runs it --------------
    push_to_hub: Annotated[
        str | None,
        _option(
            "--push-to-hub",
            metavar="REPO",
            help="Once OUT is complete (and verified, with --verify), upload it with its card to this "
            "Hub repo (created if missing).",
            panel=OUTPUT,
        ),
    ] = None
    private: Annotated[bool, _flag("--private", "With --push-to-hub: create the repo private.", OUTPUT)] = False
    quiet: Annotated[bool, _flag("--quiet/--no-quiet", "No progress display or summary.", DISPLAY, "-q")] = False
    verbose: Annotated[
        int,
        _option("--verbose", "-v", count=True, help="Say more; -v explains accepted mergekit flags.", panel=DISPLAY),
    ] = 0
    debug: Annotated[bool, _flag("--debug", "Show tracebacks for errors.", DISPLAY)] = False
    # mergekit-yaml / mergekit-moe flags: each does what it means here, or -v says why it changes nothing.
    read_to_gpu: Annotated[
        bool | None,
        _flag("--read-to-gpu/--no-read-to-gpu", "Read inputs straight into GPU memory (default: on CUDA)."),
    ] = None
    gpu_rich: Annotated[bool, _flag("--gpu-rich", "Same as --cuda --read-to-gpu.")] = False
    lazy_unpickle: Annotated[bool, _flag("--lazy-unpickle/--no-lazy-unpickle", "Always on: no effect.")] = False
    low_cpu_memory: Annotated[bool, _flag("--low-cpu-memory/--no-low-cpu-memory", "No effect (memory is bounded).")] = (
        False
    )
    multi_gpu: Annotated[bool, _flag("--multi-gpu/--no-multi-gpu", "No effect: one device is used.")] = False
    async_write: Annotated[bool, _flag("--async-write/--no-async-write", "Always on: no effect.")] = False
    write_threads: Annotated[
        int | None, _option("--write-threads", metavar="N", help="No effect: one writer thread.", panel=MERGEKIT)
    ] = None
    clone_tensors: Annotated[bool, _flag("--clone-tensors/--no-clone-tensors", "No effect.")] = False
    safe_serialization: Annotated[
        bool, _flag("--safe-serialization/--no-safe-serialization", "Always safetensors.")
    ] = True
    trust_remote_code: Annotated[
        bool, _flag("--trust-remote-code/--no-trust-remote-code", "No effect: no model code is run.")
    ] = False
    lora_merge_cache: Annotated[
        str | None, _option("--lora-merge-cache", metavar="DIR", help="No effect: nothing is cached.", panel=MERGEKIT)
    ] = None

    def validate(self) -> None:
        """Check what needs no torch (sizes, dtype names), so these errors come first and fast."""
        parse_size(self.shard_size)
        if self.lora_merge_dtype is not None:
            float_dtype_name(self.lora_merge_dtype, option="--lora-merge-dtype")
        if self.threads is not None and self.threads < 1:
            raise RecipeError(f"--threads must be at least 1, got {self.threads}", field="--threads")
        self._validate_push()

    def _validate_push(self) -> None:
        if self.private and self.push_to_hub is None:
            raise RecipeError(
                "--private needs --push-to-hub REPO: it makes the repo created there private",
                field="--private",
                hint="add --push-to-hub REPO, or drop --private",
            )
        if self.push_to_hub is not None:
            from mksuite.common.writing.hub_upload import check_can_upload, check_repo_id

            check_repo_id(self.push_to_hub)
            if not self.dry_run:
                check_can_upload(self.push_to_hub)

    def push_output(self, out, *, tool: str, notify=None) -> None:
        """With --push-to-hub: upload the finished ``out`` and say where it went (to ``notify``,
        by default the terminal)."""
        if self.push_to_hub is None or self.dry_run:
            return
        from mksuite.common.writing.hub_upload import upload_model

        url = upload_model(Path(out), self.push_to_hub, private=self.private, tool=tool)
        if not self.quiet:
            (notify or _notify)(f"uploaded {out} to {self.push_to_hub}: {url}")

    def build(self, *, overwrite: bool | None = None):
        """The engine's BuildOptions (imports torch; raises DeviceUnavailableError without the device)."""
        from mksuite.common.build import BuildOptions

        device = resolve_device(self.device, cuda=self.cuda or self.gpu_rich)
        reads = self.read_to_gpu
        return BuildOptions(
            device=device,
            threads=self.threads,
            shard_size=parse_size(self.shard_size),
            seed=self.seed,
            overwrite=self.overwrite if overwrite is None else overwrite,
            device_reads=None if reads is None else (reads and device.type == "cuda"),
            verify=self.verify,
            notify=_notify,
            unsafe_truncate_embeddings=self.unsafe_truncate_embeddings,
            precise=self.precise,
        )

    def explanations(self) -> list[str]:
        """One line per mergekit flag given that changes nothing here, saying why."""
        lines = []
        for field in dataclasses.fields(self):
            note = _NO_EFFECT.get(field.name)
            if note and getattr(self, field.name) != field.default:
                lines.append(f"{_option_name(field.name)}: {note}")
        if self.read_to_gpu and not (self.cuda or self.gpu_rich or self.device.startswith(("cuda", "auto"))):
            lines.append("--read-to-gpu: no effect with --device cpu (inputs are read to the device the math runs on)")
        return lines


def _notify(line: str) -> None:
    """How the engine's one-line reports (``--verify``, a removed stale partial) reach the user."""
    from rich.markup import escape

    from mksuite.common.cli.running import print_err

    print_err(escape(line))


_NO_EFFECT = {
    "lazy_unpickle": "always on: .bin checkpoints are read lazily through a restricted unpickler",
    "low_cpu_memory": "no effect: outputs stream to disk as they are computed, so memory stays bounded",
    "multi_gpu": "no effect: the math runs on the one --device",
    "gpu_rich": "the same as --cuda --read-to-gpu; one GPU is used",
    "async_write": "always on: a writer thread writes while the next tensors compute",
    "write_threads": "no effect: one writer thread keeps up with the math",
    "clone_tensors": "no effect: every output tensor is written from its own bytes",
    "safe_serialization": "no effect: the output is always safetensors",
    "trust_remote_code": "no effect: no code from a model repository is ever run",
    "lora_merge_cache": "no effect: adapters are applied while loading, so no merged copy is cached",
}


def _option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def shared_options(*, exclude: tuple[str, ...] = ()):
    """Decorator: the command takes every shared option (less ``exclude``) as ``opts: SharedOptions``.

    The options join the command's own parameters in its signature, which is what Typer reads.
    """
    hints = typing.get_type_hints(SharedOptions, include_extras=True)
    fields = [f for f in dataclasses.fields(SharedOptions) if f.name not in exclude]
    unknown = set(exclude) - {f.name for f in dataclasses.fields(SharedOptions)}
    assert not unknown, f"not shared options: {unknown}"

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "opts"]
        extra = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
            for f in fields
        ]

        @functools.wraps(command)
        def run(*args, **kwargs):
            shared = {f.name: kwargs.pop(f.name) for f in fields if f.name in kwargs}
            return command(*args, opts=SharedOptions(**shared), **kwargs)

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        run.__signature__ = inspect.Signature(own + extra)
        run.__annotations__ = {}
        return run

    return decorate


# -- conversions ----------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str, *, option: str = "--shard-size") -> int:
    """'5G' -> 5_000_000_000; '512MiB' -> 536870912. mergekit's 'b' (billion) is accepted too."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match and unit == "b" and match.group(1).isdigit() and len(match.group(0).strip()) <= 3:
        unit = "g"  # mergekit spells 5e9 as "5B"
    if not match or unit not in _UNITS:
        raise RecipeError(f"cannot read size {text!r}", field=option, hint="write e.g. 5G, 500M, 2GiB or 1000000")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise RecipeError(f"size must be positive, got {text!r}", field=option)
    return value


def float_dtype_name(name: str, *, option: str) -> str:
    """'torch.bfloat16' -> 'bfloat16', refusing anything but the three float dtypes."""
    bare = name.removeprefix("torch.")
    if bare not in FLOAT_DTYPE_NAMES:
        raise RecipeError(
            f"unknown dtype {name!r}; accepted: {', '.join(FLOAT_DTYPE_NAMES)}",
            field=option,
            hint=did_you_mean(bare, FLOAT_DTYPE_NAMES),
        )
    return bare


def parse_float_dtype(name: str | None, *, option: str):
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; None stays None."""
    if name is None:
        return None
    import torch

    return getattr(torch, float_dtype_name(name, option=option))


def resolve_device(device: str, cuda: bool = False):
    """The torch.device to compute on: ``auto`` is CUDA when there is one, else the CPU."""
    import torch

    name = "cuda" if cuda and device in ("cpu", "auto") else device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise RecipeError(
            f"unknown device {name!r} ({error})", field="--device", hint="cpu, cuda, cuda:N or auto"
        ) from None
    if parsed.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not available:
            flag = "--cuda" if cuda and device in ("cpu", "auto") else f"--device {device}"
            raise DeviceUnavailableError(
                f"{flag} was requested but this torch build or machine has no CUDA device",
                hint="run on --device cpu (or --device auto), or install a CUDA build of torch",
            )
        if parsed.index is not None and parsed.index >= available:
            raise DeviceUnavailableError(
                f"--device {name}: this machine has {available} CUDA device(s), numbered from 0",
                hint=f"use --device cuda:0 ... cuda:{available - 1}",
            )
    return parsed


parse_device = resolve_device  # the name the engine's callers used before
