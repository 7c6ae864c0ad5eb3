"""What the three command-line tools share: option definitions, error handling, the progress view.

Options are defined once as ``Annotated`` aliases so ``--device``, ``--threads``,
``--shard-size``, ``--seed``, ``--quiet`` read the same in mkmerge, mkstack and mkmoe.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mksuite.common.errors import MkError, OutputError, RecipeError, did_you_mean
from mksuite.common.faults import OUTPUT_ERRNOS, Terminated, signals_as_interrupts
from mksuite.common.graph import ProgressEvent

err_console = Console(stderr=True)

# -- option aliases ------------------------------------------------------------------------
OutPath = Annotated[Path, typer.Argument(help="Output directory (created atomically when the run succeeds).")]
Device = Annotated[str, typer.Option("--device", help="Where the math runs: cpu, cuda or cuda:N.")]
Cuda = Annotated[bool, typer.Option("--cuda", help="Shorthand for --device cuda (mergekit flag).")]
Threads = Annotated[int | None, typer.Option("--threads", "-j", "--num-threads", help="CPU threads for tensor math.")]
ShardSize = Annotated[
    str,
    typer.Option(
        "--shard-size",
        "--out-shard-size",
        help="Largest output shard in bytes; suffixes k/M/G (x1000) or KiB/MiB/GiB.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", "--random-seed", help="Seed for random methods (DARE, ...).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
AllowCrimes = Annotated[bool, typer.Option("--allow-crimes", help="Allow inputs of different architectures.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT if it already exists (only a model directory is replaced).")
]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify", help="Re-read the output before moving it into place: headers, checksums, config, tokenizer, card."
    ),
]
CopyTokenizer = Annotated[
    bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer", help="Copy the donor's tokenizer files.")
]
ModelCard = Annotated[
    bool,
    typer.Option("--write-model-card/--no-write-model-card", help="Write README.md and the recipe copy."),
]
CacheDir = Annotated[
    str | None, typer.Option("--cache-dir", "--transformers-cache", help="Hugging Face cache directory.")
]
LoraMergeDtype = Annotated[
    str | None,
    typer.Option(
        "--lora-merge-dtype",
        help="dtype of model+lora inputs once the adapter is applied (float32, float16, bfloat16); "
        "default: each tensor's stored dtype. The update itself is always computed in float32.",
    ),
]
LoraMergeCache = Annotated[
    str | None,
    typer.Option(
        "--lora-merge-cache",
        help="Accepted for mergekit compatibility and unused: adapters are applied while loading, "
        "so no merged copy of a model is cached.",
    ),
]

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


_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_float_dtype(name: str | None, *, option: str) -> torch.dtype | None:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; None stays None."""
    if name is None:
        return None
    dtype = _FLOAT_DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise RecipeError(
            f"unknown dtype {name!r}; accepted: {', '.join(_FLOAT_DTYPES)}",
            field=option,
            hint=did_you_mean(name.removeprefix("torch."), _FLOAT_DTYPES),
        )
    return dtype


def parse_device(device: str, cuda: bool = False) -> torch.device:
    name = "cuda" if cuda and device == "cpu" else device
    try:
        parsed = torch.device(name)
    except RuntimeError as error:
        raise RecipeError(f"unknown device {name!r} ({error})", field="--device") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise MkError(
            "--device cuda was requested but this torch build or machine has no CUDA device",
            hint="run on --device cpu, or install a CUDA build of torch",
        )
    return parsed


def build_options(
    *, device: str, cuda: bool, threads: int | None, shard_size: str, seed: int, overwrite: bool, verify: bool = False
):
    """The engine's BuildOptions from the shared command-line options (validated here)."""
    from mksuite.common.build import BuildOptions

    return BuildOptions(
        device=parse_device(device, cuda),
        threads=threads,
        shard_size=parse_size(shard_size),
        seed=seed,
        overwrite=overwrite,
        verify=verify,
        notify=lambda line: err_console.print(escape(line), highlight=False, soft_wrap=True),
    )


# 9 is --verify's mismatch (common/errors.py VerifyError).
OUT_OF_MEMORY_EXIT = 10


# -- running a command ---------------------------------------------------------------------
def _show_warning(message, category, filename, lineno, file=None, line=None):
    where = ""
    if getattr(message, "line", None) and f"line {message.line}" not in str(message):
        where = f"line {message.line}: "
    err_console.print(f"[yellow]warning:[/yellow] {escape(where + str(message))}", highlight=False, soft_wrap=True)


@contextmanager
def cli_errors(debug: bool):
    """Turn expected failures into one readable paragraph and an exit code."""
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    try:
        with signals_as_interrupts():
            yield
    except MkError as error:
        if debug:
            err_console.print_exception()
        err_console.print(f"[bold red]{escape(error.render())}[/bold red]", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except Terminated as error:
        err_console.print(f"[bold red]terminated[/bold red] by {error.signal_name}: nothing was written to the output")
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/bold red]: nothing was written to the output directory")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except MemoryError:
        err_console.print("[bold red]out of memory[/bold red]: try --threads 1 or a smaller --prefetch")
        raise typer.Exit(OUT_OF_MEMORY_EXIT) from None
    except OSError as error:
        if debug:
            raise
        text = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        code = OutputError.exit_code if error.errno in OUTPUT_ERRNOS else 1
        err_console.print(f"[bold red]system error[/bold red]: {escape(text)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    except Exception:
        if debug:
            raise
        err_console.print_exception(max_frames=3)
        err_console.print("[bold red]unexpected error[/bold red] (a bug in mksuite; rerun with --debug)")
        raise typer.Exit(70) from None
    finally:
        warnings.showwarning = previous


class ProgressView:
    """A rich progress bar fed by engine events; silent when quiet."""

    def __init__(self, label: str, quiet: bool):
        self.quiet = quiet
        self.label = label
        self.progress: Progress | None = None
        self.task_id = None
        self.started = time.perf_counter()

    def __enter__(self) -> ProgressView:
        if not self.quiet:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[tensors]} tensors"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __call__(self, event: ProgressEvent) -> None:
        if self.progress is None:
            return
        tensors = f"{event.tensors_done}/{event.tensors_total}"
        if event.kind == "start":
            self.task_id = self.progress.add_task(self.label, total=event.bytes_total, tensors=tensors)
        elif self.task_id is not None:
            self.progress.update(self.task_id, completed=event.bytes_done, tensors=tensors)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def summary(self, text: str) -> None:
        if not self.quiet:
            err_console.print(text, highlight=False)


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count} B"


def entry(app: typer.Typer) -> Callable[[], None]:
    """A console-script entry point that runs a Typer app."""

    def main() -> None:
        app(prog_name=Path(sys.argv[0]).name)

    return main
