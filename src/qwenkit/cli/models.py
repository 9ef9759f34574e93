"""`qwenkit models catalog`: the Qwen family catalog as a filterable table, or JSON for machines.

Contract: reads only the reviewed catalog (no network). Filters combine (AND); an unknown family, task or
modality is a one-line error listing the valid ones. Numbers the catalog does not confirm print as
"?"; parameter counts computed from the architecture (where no figure is published) print with "≈";
a model with numbers from a secondary source is marked "†" (JSON: `unverified`); a hybrid's layer count
shows how many layers keep a KV cache (JSON: `kv_layers`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qwenkit.catalog.schema import TASKS, Catalog, Entry, load_catalog
from qwenkit.catalog.shape import ShapeError
from qwenkit.cli.errors import friendly_errors

app = typer.Typer(
    help="The Qwen model catalog (every released Qwen, with cited facts).", no_args_is_help=True
)

MODALITIES = ("text", "image", "video", "audio")


def _computed(entry: Entry) -> dict[str, float] | None:
    try:
        shape = entry.shape()
    except ShapeError:
        return None
    return {"total": round(shape.params_total / 1e9, 3), "active": round(shape.params_active / 1e9, 3)}


def _kv_layers(entry: Entry) -> int | None:
    """Layers that carry a KV cache (a hybrid's full-attention layers), when the catalog confirms them."""
    a = entry.model.arch
    if a is None or a.layers is None:
        return None
    if not a.hybrid:
        return a.layers
    return a.layers // a.full_attention_interval if a.full_attention_interval else None


def entry_json(entry: Entry) -> dict[str, Any]:
    """One catalog entry for machines: the data as reviewed plus the family defaults and computed counts."""
    m = entry.model
    return {
        "name": m.name,
        "family": entry.family_key,
        "family_title": entry.family.title,
        "size": m.size,
        "open_weights": m.open_weights,
        "hf": m.hf,
        "hf_base": m.hf_base,
        "modelscope": m.modelscope,
        "arch": m.arch.model_dump() if m.arch else None,
        "params_published_b": m.params.model_dump(),
        "params_computed_b": _computed(entry),
        "context": m.context.model_dump() | {"extension": entry.family.context_extension},
        "modalities": entry.modalities,
        "capabilities": entry.capabilities.model_dump(),
        "specialty": entry.family.specialty,
        "license": entry.license,
        "quantized": dict(m.quantized),
        "runs_on_qwenkit_llamacpp": entry.family.supported_by_qwenkit
        and (entry.modalities == ["text"] or bool(m.arch and m.arch.hybrid)),
        "kv_layers": _kv_layers(entry),
        "notes": m.notes,
        "unverified": list(m.unverified),
        "sources": entry.sources,
    }


def _matches(
    entry: Entry,
    family: str | None,
    task: str | None,
    modality: str | None,
    max_params: float | None,
    min_context: int | None,
    name: str | None,
) -> bool:
    if family and entry.family_key != family:
        return False
    if task and entry.family.policy.fit.get(task, 0) <= 0:  # type: ignore[call-overload]
        return False
    if modality and modality not in entry.modalities:
        return False
    if name and name.lower() not in entry.name.lower():
        return False
    if max_params is not None:
        computed = _computed(entry)
        total = entry.model.params.total or (computed or {}).get("total")
        if total is None or total > max_params:
            return False
    if min_context is not None:
        ctx = entry.model.context
        longest = ctx.extended or ctx.native
        if longest is None or longest < min_context:
            return False
    return True


def _check_choice(value: str | None, choices: tuple[str, ...] | list[str], option: str) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"unknown {option} {value!r}: use one of {', '.join(choices)}")


def _ctx(n: int | None) -> str:
    if n is None:
        return "?"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _params(entry: Entry) -> str:
    p, computed = entry.model.params, _computed(entry)
    if p.total is not None:
        total = f"{p.total:g}"
    elif computed:
        total = f"≈{computed['total']:.2f}".rstrip("0").rstrip(".")
    else:
        return "?"
    if entry.is_moe:
        active = p.active if p.active is not None else (computed or {}).get("active")
        return f"{total} ({active:.1f} act.)" if active else total
    return total


def _abilities(entry: Entry) -> str:
    c = entry.capabilities
    parts = []
    if c.thinking:
        parts.append("think")
    if c.tools:
        parts.append("tools")
    if c.languages:
        parts.append(f"{c.languages} lang")
    if c.programming_languages:
        parts.append(f"{c.programming_languages} prog")
    return ", ".join(parts) or "-"


def render_table(entries: list[Entry]) -> Table:
    table = Table(title=f"Qwen catalog: {len(entries)} models", show_lines=False)
    table.add_column("model", no_wrap=True)
    for column in ("params B", "layers", "heads q/kv×dim", "context"):
        table.add_column(column, justify="right")
    for column in ("inputs", "abilities", "licence", "official quants"):
        table.add_column(column)
    for e in entries:
        a = e.model.arch
        heads = f"{a.heads or '?'}/{a.kv_heads or '?'}×{a.head_dim or '?'}" if a else "?"
        ctx = e.model.context
        context = _ctx(ctx.native) + (f"→{_ctx(ctx.extended)}" if ctx.extended else "")
        kv = _kv_layers(e)
        layers = str(a.layers) if a and a.layers else "?"
        if a and a.hybrid:
            layers += f" ({kv if kv is not None else '?'} KV)"
        table.add_row(
            e.name + ("†" if e.model.unverified else ""),
            _params(e),
            layers,
            heads,
            context,
            "+".join(m for m in e.modalities if m != "text") or "text",
            _abilities(e),
            e.license or "?",
            ", ".join(e.model.quantized) or "-",
        )
    return table


@app.command("catalog")
@friendly_errors
def catalog_command(
    family: Annotated[str | None, typer.Option(help="Only this family, e.g. qwen3, qwen2.5-coder.")] = None,
    task: Annotated[str | None, typer.Option(help=f"Only models suited to: {', '.join(TASKS)}.")] = None,
    modality: Annotated[
        str | None, typer.Option(help="Only models taking this input: image, video, audio.")
    ] = None,
    max_params: Annotated[
        float | None,
        typer.Option("--max-params", min=0, help="Only models with at most this many billion parameters."),
    ] = None,
    min_context: Annotated[
        int | None, typer.Option("--min-context", min=1, help="Only models reaching this context (tokens).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only names containing this text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every field and source).")] = False,
) -> None:
    """Show every Qwen model with the facts the planner uses, each with its sources."""
    catalog: Catalog = load_catalog()
    _check_choice(family, list(catalog.families), "family")
    _check_choice(task, TASKS, "task")
    _check_choice(modality, MODALITIES, "modality")
    entries = [e for e in catalog if _matches(e, family, task, modality, max_params, min_context, name)]
    if as_json:
        typer.echo(json.dumps([entry_json(e) for e in entries], indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # piped: keep one model per line
    console.print(render_table(entries))
    console.print(
        "? = not confirmed by a source; ≈ = computed from the architecture; † = some numbers from a "
        "secondary source; (n KV) = hybrid: only n layers keep a KV cache. "
        "Sources: qwenkit models catalog --json",
        style="dim",
    )
