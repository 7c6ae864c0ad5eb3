"""What the three command-line tools share: options, how a tool is built, errors, the progress view.

Importing this package does not import torch or rich: ``--help`` and ``--version`` stay fast.
"""

from mksuite.common.cli.app import CONTEXT, ToolCommand, command_app, entry, package_version, tool_app
from mksuite.common.cli.options import (
    OutPath,
    RecipePath,
    SharedOptions,
    parse_device,
    parse_float_dtype,
    parse_size,
    resolve_device,
    shared_options,
)
from mksuite.common.cli.progress import ProgressView, human_bytes
from mksuite.common.cli.running import cli_errors, err_console, explain_flags, print_err

__all__ = [
    "CONTEXT",
    "OutPath",
    "ProgressView",
    "RecipePath",
    "SharedOptions",
    "ToolCommand",
    "cli_errors",
    "command_app",
    "entry",
    "err_console",
    "explain_flags",
    "human_bytes",
    "package_version",
    "parse_device",
    "parse_float_dtype",
    "parse_size",
    "print_err",
    "resolve_device",
    "shared_options",
    "tool_app",
]
