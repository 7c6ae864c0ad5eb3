"""How each tool is built: a Typer app of sub-commands, one of which runs when none is named.

``mkmerge RECIPE OUT`` runs ``mkmerge merge RECIPE OUT``; ``mkmerge plan``, ``mkmerge
methods`` are listed commands. Help is click's plain formatter (fast, never truncates an option
name at 80 columns), with options grouped into sections.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer
from typer.core import TyperCommand, TyperGroup

from mksuite.common.cli.options import DISPLAY, MERGEKIT, MODELS, OUTPUT, RUN

SECTIONS = (RUN, MODELS, OUTPUT, DISPLAY, MERGEKIT)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def package_version() -> str:
    try:
        return version("mksuite")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _usage(pieces: list[str]) -> str:
    # Typer writes a required argument as {NAME}; usage lines elsewhere write NAME.
    return " ".join(p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces)


class ToolCommand(TyperCommand):
    """A command whose help lists its options in sections and whose usage shows how it was reached."""

    def format_usage(self, ctx, formatter) -> None:
        path = ctx.command_path
        if ctx.meta.get("mk.default_command") == self.name and ctx.parent is not None:
            path = ctx.parent.command_path  # reached as `mkmerge RECIPE OUT`, so shown that way
        formatter.write_usage(path, _usage(self.collect_usage_pieces(ctx)))

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                if getattr(param, "help", None):
                    name = _usage(param.get_usage_pieces(ctx)).removesuffix("...")
                    sections.setdefault("Arguments", []).append((name, param.help))
                continue
            record = param.get_help_record(ctx)
            if record is None:
                continue
            panel = getattr(param, "rich_help_panel", None) or DISPLAY  # -h, --help
            sections.setdefault(panel, []).append(record)
        order = ("Arguments", *SECTIONS)
        for panel in sorted(sections, key=lambda p: order.index(p) if p in order else len(order)):
            with formatter.section(panel):
                formatter.write_dl(sections[panel])


def default_group(command: str) -> type[TyperGroup]:
    """A group class that runs ``command`` when the first argument names no other command."""

    class DefaultGroup(TyperGroup):
        default_command = command

        def parse_args(self, ctx, args: list[str]) -> list[str]:
            group_options = {*ctx.help_option_names, "--version"}
            if args and args[0] not in self.commands and args[0] not in group_options:
                ctx.meta["mk.default_command"] = command
                args = [command, *args]
            return super().parse_args(ctx, args)

        def format_usage(self, ctx, formatter) -> None:
            pieces = self.commands[command].collect_usage_pieces(ctx)
            formatter.write_usage(ctx.command_path, _usage([p for p in pieces if p != "[OPTIONS]"] + ["[OPTIONS]"]))
            formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

        def format_commands(self, ctx, formatter) -> None:
            rows = []
            for name in self.list_commands(ctx):
                sub = self.get_command(ctx, name)
                if sub is None or sub.hidden:
                    continue
                text = sub.get_short_help_str(limit=70)
                rows.append((f"{name} (default)" if name == command else name, text))
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    return DefaultGroup


def tool_app(name: str, help: str, *, default: str) -> typer.Typer:
    """The Typer app of one tool: ``--version``, ``-h``, sub-commands, ``default`` when none is named."""
    app = typer.Typer(
        name=name,
        cls=default_group(default),
        help=help,
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        no_args_is_help=True,
        context_settings=CONTEXT,
    )

    def show_version(value: bool) -> None:
        if value:
            typer.echo(f"{name} (mksuite) {package_version()}")
            raise typer.Exit()

    @app.callback()
    def _tool(
        version: bool = typer.Option(
            False, "--version", is_eager=True, callback=show_version, help="Print the version and exit."
        ),
    ) -> None:
        pass

    return app


def command_app(help: str) -> typer.Typer:
    """A one-command Typer app (kept for callers that run a sub-command on its own, as tests do)."""
    return typer.Typer(
        help=help,
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings=CONTEXT,
    )


def entry(app: typer.Typer, name: str):
    """A console-script entry point running ``app`` under the tool's name."""

    def main() -> None:
        app(prog_name=name)

    main.__doc__ = f"Console entry of {name}."
    return main
