"""One hierarchy of domain errors, and the one table of exit codes.

Every error the tools expect to meet (a bad recipe, a missing model, a corrupt file, a
shape conflict) is an :class:`MkError`. Each carries the data that identifies the culprit
(which model, which tensor, which recipe field and line) and renders as one readable
paragraph with a fix where one is known. The CLIs print ``render()`` and exit with
``exit_code``; a traceback is shown only with ``--debug``.

Exit codes, the same for mkmerge, mkstack and mkmoe (the README copies this table;
tests/engine/test_exit_codes.py holds every class and a catalogue of bad inputs to it):

====  ===================================  ==========================================================
code  raised as                            meaning
====  ===================================  ==========================================================
0                                          success
1     MkError                              another expected failure (an OS error outside the output)
2     RecipeError                          the recipe or command line: YAML, fields, methods, options,
                                           parameter values outside their domain (negative density,
                                           gamma outside [0, 1], epsilon < 0, DELLA's window)
3     ModelNotFoundError                   a model reference resolves to nothing: no directory, no
                                           config.json, no weights, not in the Hub cache
4     ModelFileError, TensorFileError,     a file of an input model is unusable: truncated or
      UnsafePickleError, AdapterError      lying weight headers, unsafe pickles, unparseable
                                           config/tokenizer files, files resolving outside the
                                           model, quantized formats not read, custom code that
                                           cannot be carried, a bad LoRA adapter
5     ArchitectureError                    no architecture description fits, or inputs differ
6     ShapeMismatchError,                  tensors that must agree in shape do not; a tensor
      MissingTensorError                   the architecture needs is absent
7     MergeError                           the math cannot proceed with these tensors: weights
                                           summing to zero, a density keeping nothing of a tensor,
                                           inputs cancelling out
8     OutputError                          the output location cannot be written, or is an input
9     VerifyError                          --verify re-read the output and found a mismatch
10    DeviceUnavailableError               the requested device is not there (--cuda without CUDA)
11    (MemoryError)                        out of memory
12    HubUploadError                       the output was written, but --push-to-hub could not
                                           upload it (not logged in, no write access, offline,
                                           the Hub unreachable); the local output is kept
70    (any other exception)                a bug in mksuite (a short traceback is printed)
128+n (KeyboardInterrupt, Terminated)      interrupted by signal n (130 Ctrl-C, 143 SIGTERM, 129
                                           SIGHUP); nothing is left at the output
====  ===================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable

from mksuite.common.suggest import suggestion


class MkError(Exception):
    """Base of all expected failures: a clean message, an optional hint, an exit code."""

    exit_code = 1
    title = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def within(self, context: str) -> MkError:
        """This error, its message prefixed with where it happened (e.g. the recipe stage)."""
        self.message = f"{context}: {self.message}"
        self.args = (self.message,)
        return self

    def render(self) -> str:
        text = f"{self.title}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RecipeError(MkError):
    """The recipe (or command line) is malformed: names the field and, when known, the line."""

    exit_code = 2
    title = "recipe error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        file: str | None = None,
        hint: str | None = None,
    ):
        self.field = field
        self.line = line
        self.file = file
        self.bare_message = message
        where = []
        if file:
            where.append(str(file) + (f":{line}" if line else ""))
        elif line:
            where.append(f"line {line}")
        if field:
            where.append(f"field `{field}`")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message, hint=hint)

    def in_file(self, file: str | None) -> RecipeError:
        """The same error, located in ``file`` (for errors raised after parsing)."""
        if self.file or not file:
            return self
        located = RecipeError(self.bare_message, field=self.field, line=self.line, file=file, hint=self.hint)
        return located


class ModelNotFoundError(MkError):
    """A model reference resolves to nothing: no local directory, no usable Hub snapshot."""

    exit_code = 3
    title = "model not found"

    def __init__(self, message: str, *, model: str | None = None, hint: str | None = None):
        self.model = model
        super().__init__(message, hint=hint)


class ModelFileError(MkError):
    """A file of an input model is unusable: corrupt, unparseable, outside the model, or a
    format the tools do not read (quantized weights, custom code that cannot be carried)."""

    exit_code = 4
    title = "bad model file"

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.path = path
        super().__init__(message, hint=hint)


class TensorFileError(ModelFileError):
    """A weight file is truncated, corrupt, or not what its name says."""

    title = "bad weight file"


class UnsafePickleError(TensorFileError):
    """A legacy .bin checkpoint asks the unpickler for something other than tensor data."""

    title = "refused unsafe pickle"


class AdapterError(TensorFileError):
    """A LoRA adapter is malformed, or uses a feature that cannot be applied as W + s·B·A."""

    title = "bad LoRA adapter"


class ArchitectureError(MkError):
    """Architecture definitions are missing, inconsistent, or mixed without --allow-crimes."""

    exit_code = 5
    title = "architecture error"


class ShapeMismatchError(MkError):
    """Input tensors that must agree in shape do not."""

    exit_code = 6
    title = "shape mismatch"


class MissingTensorError(MkError):
    """A required tensor is absent from an input model."""

    exit_code = 6
    title = "missing tensor"


class MergeError(MkError):
    """The math cannot proceed with these inputs (weights summing to zero, k = 0, ...)."""

    exit_code = 7
    title = "merge error"


class OutputError(MkError):
    """The output location cannot be written (exists, not a directory, disk full)."""

    exit_code = 8
    title = "output error"


class VerifyError(MkError):
    """``--verify`` re-read the output and found it differs from what was written."""

    exit_code = 9
    title = "verification failed"


class DeviceUnavailableError(MkError):
    """The requested compute device does not exist here (--cuda without a CUDA device)."""

    exit_code = 10
    title = "device unavailable"


class HubUploadError(MkError):
    """``--push-to-hub`` failed after the output was complete; the output itself is kept."""

    exit_code = 12
    title = "upload failed"


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """A "did you mean X?" hint for a misspelled name, or None when nothing is close
    (:func:`mksuite.common.suggest.suggestion`: typing slips, swaps included, rank first)."""
    return suggestion(name, known)
