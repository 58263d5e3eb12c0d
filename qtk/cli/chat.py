"""``qtk chat MODEL``: streaming multi-turn chat in the terminal, for any format qtk verify reads."""

from __future__ import annotations

import sys

import click

from ._output import get_output, stdin_is_tty

__all__ = ["chat_cmd"]

HELP = "Commands: /reset (forget the conversation), /exit (or Ctrl-D)."


@click.command("chat")
@click.argument("model")
@click.option("--gguf-file", help="GGUF file name inside a repo-id MODEL.")
@click.option("--system", "system_prompt", help="System message for the conversation.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, help="llama.cpp threads (GGUF).")
def chat_cmd(model, gguf_file, system_prompt, max_new_tokens, temperature, top_p, seed, device, threads) -> None:
    """Chat with a model (HF checkpoint, GGUF, or repo id) through its chat template, streaming.

    Answers stream as they are generated and stop on the model's terminators. Reads one user turn per
    line; works with piped stdin for scripted use (answers go to stdout, one per turn).

    \b
    Examples:
      qtk chat ./smol-gptq --system "You are terse."
      printf 'Hi\\nWhat is 2+2?\\n' | qtk chat model.gguf
    """
    from .._stdio import stdout_to_stderr
    from ..verify.models import open_model
    from ..devices import resolve_device

    out = get_output()
    interactive = stdin_is_tty()
    with stdout_to_stderr():
        m = open_model(model, gguf_file=gguf_file, device=resolve_device(device), threads=threads)
    if interactive:
        out.err.print(f"Chatting with {m.name} ({m.format}). {HELP}")
    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(base)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                click.echo("", err=True)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(base)
            out.err.print("(conversation reset)")
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        for piece in m.stream(history, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed):
            pieces.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo("")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})

