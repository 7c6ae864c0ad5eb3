"""What a person reads while a tool runs: phases, labelled times, steady plain lines, grouped warnings."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest
import typer
from safetensors import safe_open

from mksuite.common.build import BuildOptions
from mksuite.common.cli import ProgressView, cli_errors, err_console
from mksuite.common.graph.events import ProgressEvent


@pytest.fixture
def stderr(monkeypatch):
    """What the tools print to stderr, as plain text."""
    buffer = io.StringIO()
    monkeypatch.setattr(err_console(), "_file", buffer)  # restored to None: sys.stderr again
    return buffer


def feed(view: ProgressView, total_tensors: int, total_bytes: int, steps: int) -> None:
    view(ProgressEvent("start", tensors_total=total_tensors, bytes_total=total_bytes))
    for step in range(1, steps + 1):
        view(
            ProgressEvent(
                "tensor_written",
                name=f"t{step}",
                tensors_done=step * total_tensors // steps,
                tensors_total=total_tensors,
                bytes_done=step * total_bytes // steps,
                bytes_total=total_bytes,
            )
        )


def test_without_a_terminal_a_plain_line_comes_every_tenth_with_labelled_times(stderr):
    with ProgressView("merging", quiet=False, terminal=False) as view:
        feed(view, 219, 10**9, steps=100)
    lines = stderr.getvalue().splitlines()
    assert lines[:2] == ["planning...", "merging..."]
    progress = [line for line in lines if line.startswith("merging: ")]
    assert [re.search(r"(\d+)%", line).group(1) for line in progress] == [str(p) for p in range(10, 101, 10)]
    assert all("elapsed " in line and "remaining " in line and "/219 tensors" in line for line in progress)
    assert lines[-1] == "writing..."


def test_phases_are_shown_once_each_and_quiet_shows_nothing(stderr):
    with ProgressView("merging", quiet=False, terminal=False) as view:
        view.phase("computing gates")
        view.phase("computing gates")
        view(ProgressEvent("phase", name="verifying"))
    assert stderr.getvalue().splitlines() == ["planning...", "computing gates...", "verifying..."]
    with ProgressView("merging", quiet=True, terminal=False) as view:
        feed(view, 10, 100, steps=10)
        view.phase("verifying")
        view.summary("done")
    assert stderr.getvalue().count("\n") == 3


def test_progress_counts_output_tensors_not_row_blocks(tmp_path):
    import torch

    from mksuite.common.build import build_model
    from mksuite.common.graph.tasks import OutputTensor, Task

    class Const(Task):
        def __init__(self, value):
            self.value = value

        def execute(self, inputs, ctx):
            return self.value

    full = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    blocks = [(6, 10), (0, 3), (3, 6)]
    outputs = [OutputTensor("w", torch.float32, (10, 4), Const(full[a:b].clone()), rows=(a, b)) for a, b in blocks]
    outputs.append(OutputTensor("v", torch.float32, (4,), Const(torch.ones(4))))
    events = []
    stats = build_model(outputs, {}, tmp_path / "out", BuildOptions(), finalize=lambda d: None, listener=events.append)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        in_file = len(list(handle.keys()))
    written = [e for e in events if e.kind == "tensor_written"]
    assert len(written) == 4 and in_file == 2  # three row blocks of w, then v
    assert events[0].tensors_total == events[-1].tensors_done == stats.tensors == in_file
    dones = [e.tensors_done for e in written]  # rises once per tensor, at its last block
    assert dones == sorted(dones) and sum(b > a for a, b in zip([0, *dones], dones)) == 2


def test_repeated_warnings_of_one_kind_print_once_then_a_count_and_the_worst(stderr):
    def warn(t: float) -> None:
        warnings.warn(f"model_stock, tensor layers.3.q: t = {t}, so the merge extrapolates", stacklevel=2)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with cli_errors(debug=False):
            for t in (1.2, 3.5, -0.4, 1.1):
                warn(t)
            warnings.warn("something else entirely", stacklevel=1)
    lines = stderr.getvalue().splitlines()
    assert [line for line in lines if "t = " in line and "given" not in line] == [
        "warning: model_stock, tensor layers.3.q: t = 1.2, so the merge extrapolates"
    ]
    summary = [line for line in lines if "given" in line]
    assert len(summary) == 1 and "4 times" in summary[0] and "t = 3.5" in summary[0]
    assert "warning: something else entirely" in lines


def test_errors_exit_with_their_code_and_hub_lines_print_once(stderr):
    from mksuite.common.errors import DeviceUnavailableError

    with pytest.raises(typer.Exit) as exit_info, cli_errors(debug=False):
        raise DeviceUnavailableError("--cuda was requested")
    assert exit_info.value.exit_code == 10 and "device unavailable: --cuda was requested" in stderr.getvalue()
    assert logging.getLogger("huggingface_hub").propagate is False
