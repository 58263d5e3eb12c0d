"""Human and JSON output, carried in the Click context (no module-level singleton).

Human messages go to stderr; the result a script wants (a path, a listing or report table, or the
JSON document) goes to stdout. Everything printed passes through :func:`qtk.errors.redact`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import click
from rich.console import Console

from .. import _json
from ..errors import redact

__all__ = ["Output", "get_output"]


def _stderr_console() -> Console:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 200  # logs and CI: do not squeeze tables into 80 columns
    return console


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    debug: bool = False
    err: Console = field(default_factory=lambda: _stderr_console())

    @property
    def interactive(self) -> bool:
        """Progress bars only on a terminal, and never with --quiet or --json."""
        return not (self.quiet or self.json_mode) and self.err.is_terminal and os.environ.get("CI", "") == ""

    def info(self, text: str) -> None:
        if not (self.quiet or self.json_mode):
            self.err.print(redact(text))

    def warn(self, text: str) -> None:
        self.err.print(f"[yellow]Warning:[/yellow] {redact(text)}")

    def error(self, text: str) -> None:
        self.err.print(f"[bold red]Error:[/bold red] {redact(text)}", markup=True)

    def result(self, text: str) -> None:
        """The line a script captures (stdout)."""
        if not self.json_mode:
            click.echo(redact(text))

    def table(self, renderable) -> None:
        """A result that is a table (a listing, a report): to stdout, like every result; colours only when
        stdout is a terminal. Nothing with --json (the JSON document is the result then)."""
        if self.json_mode:
            return
        con = Console(highlight=False)  # stdout as it is now (CliRunner swaps it)
        if not con.is_terminal:
            con.width = 200
        with con.capture() as cap:
            con.print(renderable)
        click.echo(redact(cap.get()), nl=False)

    def json(self, obj) -> None:
        click.echo(redact(_json.dumps(obj, indent=2)))


def get_output(ctx: click.Context | None = None) -> Output:
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    out = root.meta.get("qtk.output")
    if out is None:
        out = Output()
        root.meta["qtk.output"] = out
    return out


def stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()
