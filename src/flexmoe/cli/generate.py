"""`flexmoe generate`: text from a merged model with chosen experts, and its attribution."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmoe.cli import console, out
from flexmoe.cli.options import (
    AllowNoPublicOption,
    DeviceOption,
    DtypeOption,
    ExcludeOption,
    IncludeOption,
    PreselectOption,
    StateOption,
    UseOption,
    check_use,
    model_positions,
    split_names,
)
from flexmoe.errors import FlexmoeError


def generate_cmd(
    model: Annotated[Path, typer.Option(help="A merged model directory.")],
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    attribution: Annotated[
        bool, typer.Option(help="Show each expert's share of routing weight.")
    ] = False,
    per_layer: Annotated[bool, typer.Option(help="Attribution per layer too.")] = False,
    routed_experts: Annotated[
        bool,
        typer.Option(
            help="Print, as a last line of JSON, the expert ids every prompt and generated token "
            "was computed with per MoE layer (vLLM's routed_experts layout; -1 = empty slot)."
        ),
    ] = False,
    use: UseOption = None,
    allow_no_public: AllowNoPublicOption = False,
    preselect: PreselectOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    state: StateOption = None,
) -> None:
    """Generate text with chosen experts (KV cache); optionally attribute it to experts."""
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.inference.generate import generate
    from flexmoe.store.merged import experts_of, is_merged, load_model

    check_use(use)
    from flexmoe.model.device import place

    tok = load_tokenizer(model)
    positions = model_positions(model)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    if positions is not None and n_prompt + max_new_tokens > positions:
        raise FlexmoeError(
            f"the prompt ({n_prompt:,} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
            f"the {positions:,} positions of {model}"
        )
    m = place(load_model(model, state), device, dtype)
    if experts_of(m).router_tuned:
        console.print("note: router-tuned model", style="yellow")
    g = generate(
        m,
        tok,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        include=split_names(include),
        exclude=split_names(exclude),
        attribution=attribution,
        per_layer=per_layer,
        seed=seed,
        allow_no_public=allow_no_public,
        use=use,
        preselect=preselect,
        routed_experts=routed_experts,
    )
    if is_merged(m) and (experts_of(m).preselect if preselect is None else preselect):
        console.print("preselected: " + ", ".join(g.active))
    for name, reason in g.excluded:
        console.print(f"expert '{name}' masked: {reason}", style="yellow")
    out.print(prompt + g.text)
    if g.attribution is not None or g.per_layer is not None:
        names = experts_of(m).names
        table = Table(title=f"attribution over {len(g.token_ids)} generated tokens")
        table.add_column("expert")
        if g.attribution is not None:
            table.add_column("share", justify="right")
        for i in range(len(g.per_layer or [])):
            table.add_column(f"L{i}", justify="right")
        for n in names:
            cells = [n + ("" if n in g.active else " (off)")]
            if g.attribution is not None:
                cells.append(f"{g.attribution[n]:.3f}")
            cells += [f"{row[n]:.3f}" for row in g.per_layer or []]
            table.add_row(*cells)
        out.print(table)
    if g.routed_experts is not None:
        _print_routed_experts(g)


def _print_routed_experts(g) -> None:
    """One line of JSON, last on stdout (`| tail -n1` reads it): vLLM's field names, so a
    routing-replay client reads it as it reads vLLM's answer, plus the token ids the rows align
    with. json.dumps escapes every control character, so it is printed as is, never cut."""
    import json

    record = {
        "prompt_token_ids": g.prompt_ids,
        "token_ids": g.token_ids,
        "prompt_routed_experts": g.prompt_routed_experts,
        "routed_experts": g.routed_experts,
        "expert_names": g.expert_names,
    }
    typer.echo(json.dumps(record, separators=(",", ":")))
