"""Running a command: errors to exit codes, warnings grouped by kind, quiet third-party output.

rich is imported when a command runs, not when the module is, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import warnings
from contextlib import contextmanager

import typer

from mksuite.common.errors import MkError, OutputError
from mksuite.common.faults import OUTPUT_ERRNOS, Terminated, signals_as_interrupts

# Exit codes that are not an MkError's (those are listed in common/errors.py; 9 is --verify's
# mismatch, 10 a device that is not there).
EXIT_OUT_OF_MEMORY = 11
EXIT_OS_ERROR = 1
EXIT_BUG = 70
EXIT_INTERRUPTED = 130


@functools.cache
def err_console():
    """The stderr console every message and progress line goes through."""
    from rich.console import Console

    return Console(stderr=True)


def print_err(text: str, **kw) -> None:
    err_console().print(text, highlight=False, soft_wrap=True, **kw)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# A number on its own (not part of a name such as layers.12.mlp): what "worst" is judged by.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def _severity(message) -> float:
    explicit = getattr(message, "severity", None)
    if explicit is not None:
        return float(explicit)
    return max((abs(float(n)) for n in _NUMBER.findall(str(message))), default=0.0)


class WarningDigest:
    """Shows the first warning of each kind at once; repeats are counted and summarised at the end.

    A kind is the place in the code that warns (file and line): one method warning once per
    tensor is one kind, so a run prints it once plus "and N more like it", with the worst case.
    """

    def __init__(self):
        self.kinds: dict[tuple, list] = {}  # kind -> [count, first text, worst severity, worst text]
        self.lock = threading.Lock()

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        where = ""
        if getattr(message, "line", None) and f"line {message.line}" not in str(message):
            where = f"line {message.line}: "
        text = where + str(message)
        # A warning that is about one distinct thing each time (a notice about the output
        # location) is shown every time; the rest are grouped by where in the code they come from.
        kind = (category, filename, lineno) if not getattr(message, "ungrouped", False) else (text,)
        severity = _severity(message)
        with self.lock:
            seen = self.kinds.get(kind)
            if seen is None:
                self.kinds[kind] = [1, text, severity, text]
            else:
                seen[0] += 1
                if severity > seen[2]:
                    seen[2], seen[3] = severity, text
        if seen is None:
            print_err(f"[yellow]warning:[/yellow] {_escape(text)}")

    def summarise(self) -> None:
        for count, first, _, worst in self.kinds.values():
            if count > 1:
                tail = f"; worst: {_escape(worst)}" if worst != first else ""
                print_err(f"[yellow]warning:[/yellow] the warning above was given {count} times in all{tail}")


def explain_flags(opts, unused: dict[str, str] | None = None) -> None:
    """With -v, one line per mergekit flag given that changes nothing here; ``unused``: this tool's own.

    ``unused`` maps a SharedOptions field to why this tool has no use for it.
    """
    lines = opts.explanations()
    for name, why in (unused or {}).items():
        if getattr(opts, name) != getattr(type(opts), name):
            lines.append(f"--{name.replace('_', '-')}: {why}")
    if opts.verbose and not opts.quiet:
        for line in lines:
            print_err(f"note: {line}", style="dim")
    if not opts.safe_serialization:
        warnings.warn("--no-safe-serialization: the output is written as safetensors all the same", stacklevel=2)


def quiet_third_party() -> None:
    """Keep transformers' and huggingface_hub's own progress bars out of our output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import sys

    # huggingface_hub logs through its own handler and to the root logger ours prints from,
    # so each of its lines (Hub retries) came out twice.
    logging.getLogger("huggingface_hub").propagate = False

    # Already imported (in a test, a notebook): switch their bars off through their own API.
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # a transformers without the switch: its bars are the least of it
            pass
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@contextmanager
def cli_errors(debug: bool, verbose: int = 0):
    """Turn expected failures into one readable paragraph and a documented exit code."""
    digest = WarningDigest()
    previous = warnings.showwarning
    warnings.showwarning = digest.show
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    quiet_third_party()
    try:
        with signals_as_interrupts():
            yield
    except MkError as error:
        if debug:
            err_console().print_exception()
        print_err(f"[bold red]{_escape(error.render())}[/bold red]")
        raise typer.Exit(error.exit_code) from None
    except Terminated as error:
        print_err(f"[bold red]terminated[/bold red] by {error.signal_name}: nothing was written to the output")
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        print_err("[bold red]interrupted[/bold red]: nothing was written to the output directory")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except MemoryError:
        print_err("[bold red]out of memory[/bold red]: try --threads 1 or a smaller --shard-size")
        raise typer.Exit(EXIT_OUT_OF_MEMORY) from None
    except OSError as error:
        if debug:
            raise
        text = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        code = OutputError.exit_code if error.errno in OUTPUT_ERRNOS else EXIT_OS_ERROR
        print_err(f"[bold red]system error[/bold red]: {_escape(text)}")
        raise typer.Exit(code) from None
    except Exception:
        if debug:
            raise
        err_console().print_exception(max_frames=3)
        print_err("[bold red]unexpected error[/bold red] (a bug in mksuite; rerun with --debug)")
        raise typer.Exit(EXIT_BUG) from None
    finally:
        warnings.showwarning = previous
        digest.summarise()
