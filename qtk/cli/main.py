"""The ``qtk`` command: the root group and the one place where errors become messages and exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import click
from rich.markup import escape

from .. import __version__, errors
from ._output import get_output

__all__ = ["cli", "main"]


class QtkGroup(click.Group):
    """Runs a subcommand and turns qtk errors into a message + their documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            get_output(ctx).error("Interrupted. Finished bytes are kept; re-run the same command to resume.")
            raise click.exceptions.Exit(errors.EXIT_INTERRUPTED) from None
        except errors.QtkError as exc:
            _report(ctx, exc)
            raise click.exceptions.Exit(exc.exit_code) from None
        except Exception as exc:  # a bug or an unmapped library error: still no bare traceback by default
            out = get_output(ctx)
            if out.debug:
                out.err.print(errors.redact(traceback.format_exc()), markup=False)
            out.error(f"Unexpected {type(exc).__name__}: {exc}")
            out.err.print("This is likely a bug in qtk. Re-run with QTK_DEBUG=1 (or qtk --debug) for the traceback.")
            if out.json_mode:
                out.json({"error": type(exc).__name__, "message": errors.redact(str(exc)), "hint": None, "exit_code": 1})
            raise click.exceptions.Exit(1) from None


def _report(ctx: click.Context, exc: errors.QtkError) -> None:
    out = get_output(ctx)
    if out.debug:
        out.err.print(errors.redact(traceback.format_exc()), markup=False)
    # escaped: messages and hints carry brackets ("pip install 'qtk[verify]'") that are not markup
    out.err.print(f"[bold red]Error:[/bold red] {escape(errors.redact(exc.message))}", markup=True, highlight=False)
    if exc.hint:
        out.err.print(f"[dim]Hint:[/dim] {escape(errors.redact(exc.hint))}", markup=True, highlight=False)
    if out.json_mode:
        out.json(exc.to_dict())


@click.group(cls=QtkGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qtk")
@click.option("--debug", is_flag=True, envvar="QTK_DEBUG", help="Show tracebacks for errors (or set QTK_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """qtk: pull open-weights LLMs from the Hugging Face Hub, quantize them, and prove they still work.

    \b
    Environment: HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE (as huggingface_hub).
    Exit codes: `qtk exit-codes`.
    """
    get_output(ctx).debug = debug


@cli.command("exit-codes")
def exit_codes() -> None:
    """List qtk's exit codes and what each means."""
    for code, name, meaning in errors.exit_code_table():
        click.echo(f"{code:>4}  {name:<22} {meaning}")


def _register() -> None:
    from . import cache, chat, hub, plan, provision, quantize, verify

    cli.add_command(hub.login)
    cli.add_command(hub.whoami)
    cli.add_command(hub.logout)
    cli.add_command(hub.pull_cmd)
    cli.add_command(hub.serve)
    cli.add_command(cache.cache_group)
    cli.add_command(plan.plan_cmd)
    cli.add_command(quantize.quantize_cmd)
    cli.add_command(quantize.calibration)
    cli.add_command(verify.verify_cmd)
    cli.add_command(chat.chat_cmd)
    cli.add_command(provision.provision_group)


_register()


def main() -> None:
    """Console entry point. After Ctrl-C (everything already cleaned up on the way out) the process
    exits at once: quantization backends keep worker threads that would otherwise run on."""
    try:
        code = cli.main(prog_name="qtk", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except KeyboardInterrupt:
        code = errors.EXIT_INTERRUPTED
    code = code if isinstance(code, int) else 0
    if code == errors.EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
