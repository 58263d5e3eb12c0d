"""Option bundles shared by commands."""

from __future__ import annotations

import click

from ._output import get_output

__all__ = ["json_option", "quiet_option"]


def _set_json(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        get_output(ctx).json_mode = True
    return value


def _set_quiet(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        get_output(ctx).quiet = True
    return value


def json_option(f):
    return click.option(
        "--json", "json_", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
        help="Print one machine-readable JSON document on stdout (errors too) instead of text.",
    )(f)


def quiet_option(f):
    return click.option(
        "-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
        help="No progress bars or chatter; only the result (and errors).",
    )(f)
