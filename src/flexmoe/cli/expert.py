"""`flexmoe expert` and `flexmoe keys`: train, calibrate, verify, sign expert packages; choose
router-tuning proxies; make signing keys."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli import clean, out
from flexmoe.cli.options import (
    BatchSizeOption,
    Bf16Option,
    CkptEveryOption,
    ConsentExpiresOption,
    ConsentUseOption,
    DeviceOption,
    DtypeOption,
    GradAccumOption,
    LrOption,
    OverwriteOption,
    RestartOption,
    ResumeOption,
    SeqLenOption,
    StepsOption,
    StopAfterOption,
    WarmupOption,
    consent_expiry,
)

expert_app = typer.Typer(
    help="Experts: train against the frozen anchor, verify packages.", no_args_is_help=True
)
keys_app = typer.Typer(help="Signing keys for expert packages (Ed25519).", no_args_is_help=True)


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
    consent_use: ConsentUseOption = None,
    consent_expires: ConsentExpiresOption = None,
    router_init: Annotated[str, typer.Option(help="domain | random | hidden")] = "domain",
    router_docs: Annotated[int, typer.Option(help="Owner documents to embed.")] = 1000,
    dense: Annotated[
        bool, typer.Option(help="Baseline: continue-pretrain the whole anchor instead.")
    ] = False,
    steps: StepsOption = None,
    batch_size: BatchSizeOption = None,
    seq_len: SeqLenOption = None,
    lr: LrOption = None,
    warmup: WarmupOption = None,
    grad_accum: GradAccumOption = None,
    bf16: Bf16Option = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    ckpt_every: CkptEveryOption = None,
    resume: ResumeOption = False,
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
    bias_init: Annotated[
        float | None,
        typer.Option(
            help="Router bias at step 0 (≤ 0); unused where the family's merge drops the bias "
            "(Llama/SmolLM/Mistral: trained with b ≡ 0)."
        ),
    ] = None,
    router_z_loss: Annotated[
        float | None, typer.Option(help="Router z-loss weight (AI2: 1e-3).")
    ] = None,
    overwrite: OverwriteOption = False,
    restart: RestartOption = False,
    stop_after: StopAfterOption = None,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="Train with DP-SGD (Opacus) to this ε per owner document."),
    ] = None,
    dp_delta: Annotated[
        float | None, typer.Option(help="DP δ (default min(1e-5, 1/(10·documents))).")
    ] = None,
    max_grad_norm: Annotated[float, typer.Option(help="DP per-document clipping norm.")] = 1.0,
    dp_epochs: Annotated[int, typer.Option(help="DP passes over the documents.")] = 1,
    rank: Annotated[
        int | None,
        typer.Option(help="Train the FFN as a rank-R delta on the anchor's (low-rank expert)."),
    ] = None,
) -> None:
    """Train an expert on private data against the frozen anchor; write its package."""

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
    expires = consent_expiry(consent_expires)
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
        rank=rank,
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
    owner_target: Annotated[
        str,
        typer.Option(
            help="owner: push the owner's tokens to its expert; trained: keep their routing as "
            "trained (pre-norm anchors: Llama, Qwen3)."
        ),
    ] = "owner",
    method: Annotated[
        str,
        typer.Option(
            help="classifier: fit each layer's gate on its router inputs; lm: fit all layers' "
            "owner rows with the LM loss of the owner's model in the loop (pre-norm anchors)."
        ),
    ] = "classifier",
    steps: Annotated[int, typer.Option(help="lm method: Adam steps.")] = 60,
    lr: Annotated[float, typer.Option(help="lm method: Adam learning rate.")] = 1e-3,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for the windows.")] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Fit an existing package's gate to decline public text (no FFN retraining)."""
    from flexmoe.lifecycle.expert import calibrate_package, make_recipe

    rec = make_recipe(
        "flexmoe",
        calibrate=True,
        calibrate_method=method,
        calibrate_public_weight=public_weight,
        calibrate_windows=windows,
        calibrate_owner_target=owner_target,
        calibrate_steps=steps,
        calibrate_lr=lr,
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


@expert_app.command("centroid")
def expert_centroid(
    package: Annotated[Path, typer.Argument(help="The expert package (trained without one).")],
    anchor: Annotated[Path, typer.Option(help="The anchor it was built on.")],
    data: Annotated[Path, typer.Option(help="Token shards of the owner's training data.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Package directory to write.")],
    overwrite: OverwriteOption = False,
) -> None:
    """Add the preselection statistics (hidden centroid, MiniLM prototypes) to an older package
    (weights unchanged; written unsigned: sign it again)."""
    from flexmoe.lifecycle.expert import add_centroid

    m = add_centroid(anchor, package, data, out_dir, overwrite=overwrite)
    out.print(f"preselection statistics added to expert '{clean(m['name'], 64)}' → {out_dir}")


@expert_app.command("compress")
def expert_compress(
    package: Annotated[Path, typer.Argument(help="Expert package directory.")],
    anchor: Annotated[Path, typer.Option(help="The anchor it is built on.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Compressed package to write.")],
    rank: Annotated[int | None, typer.Option(help="Rank kept per FFN matrix.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="Keep the smallest rank holding this share (0-1] of each delta's norm²."),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Store the expert's FFN as low-rank deltas from the anchor (truncated SVD; FlexMoRE). The
    package verifies, merges and exports as before; it is written unsigned (sign it again)."""
    from flexmoe.lifecycle.compress import compress_package

    m = compress_package(package, anchor, out_dir, rank=rank, energy=energy, overwrite=overwrite)
    c = m["compression"]
    ranks = sorted(c["ranks"].values())
    out.print(f"compressed package '{m['name']}' → {out_dir}")
    out.print(
        f"ranks {ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]}), "
        f"energy kept {c['energy']:.4f}, FFN parameters {c['parameters_stored']:,} of "
        f"{c['parameters_full']:,} ({c['parameters_stored'] / c['parameters_full']:.1%})"
    )


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
    selection: Annotated[
        str,
        typer.Option(
            help="relevance: the k most owner-like; diverse: the most owner-like of k clusters "
            "of the 4k most owner-like."
        ),
    ] = "relevance",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Choose proxy documents from PUBLIC data for router tuning; writes public ids only."""
    from flexmoe.errors import FlexmoeError
    from flexmoe.lifecycle.router_tune import (
        PROXY_FORMAT,
        SELECTIONS,
        read_owner_texts,
        read_public,
        select_proxies,
        write_proxies,
    )
    from flexmoe.store.fsutil import guard_file

    if selection not in SELECTIONS:
        raise FlexmoeError(f"--selection {clean(selection, 40)}: one of {', '.join(SELECTIONS)}")
    guard_file(out_path, "--out", PROXY_FORMAT, overwrite)
    label, texts = read_owner_texts(data, corpus, max_owner_docs, seed)
    docs = read_public(public)
    ids = select_proxies(texts, docs, k, seed, selection)
    write_proxies(out_path, owner or label, public, ids, selection)
    out.print(f"{len(ids)} proxy ids from {len(docs)} public documents → {out_path}")


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


@keys_app.command("new")
def keys_new(
    path: Annotated[Path, typer.Argument(help="Private key file to write (PATH.pub: public key).")],
    overwrite: Annotated[bool, typer.Option(help="Replace existing key files.")] = False,
) -> None:
    """Create a signing key: PATH (private, mode 0600) and PATH.pub (share it with mergers)."""
    from flexmoe.store.signing import new_key

    key_id = new_key(path, overwrite=overwrite)
    out.print(f"key {key_id}: private {path}, public {path}.pub")
