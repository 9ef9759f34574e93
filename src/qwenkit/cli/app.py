"""The `qwenkit` command: one typer app, one sub-module per command group."""

from __future__ import annotations

from typing import Annotated

import typer

from qwenkit import __version__
from qwenkit.cli import batch, bench, compare, convert, demo, fidelity, models, plan, render, run, serve, tune
from qwenkit.cli import eval as eval_cli

app = typer.Typer(
    name="qwenkit",
    help="Pick, run, serve, quantize, tune, evaluate and watch Qwen-family models on your own hardware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(demo.app, name="demo")
app.add_typer(models.app, name="models")
app.command("serve")(serve.serve_command)
app.command("generate")(run.generate_command)
app.command("chat")(run.chat_command)
app.command("render")(render.render_command)
app.command("convert")(convert.convert_command)
app.command("quantize")(convert.quantize_command)
app.command("plan")(plan.plan_command)
app.command("select")(plan.select_command)
app.command("doctor")(plan.doctor_command)
app.command("bench")(bench.bench_command)
app.command("fidelity")(fidelity.fidelity_command)
app.command("compare")(compare.compare_command)
app.command("eval")(eval_cli.eval_command)
app.command("batch")(batch.batch_command)
app.add_typer(tune.app, name="tune")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qwenkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """qwenkit: Qwen models on your own hardware."""


def main() -> None:
    app()
