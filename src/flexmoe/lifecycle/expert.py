"""Expert training: one data owner, alone, against the frozen anchor (FlexOlmo §3.3).

The owner's model is a 2-expert FlexOlmo: expert 0 is the public (anchor) FFN, expert 1 starts as
a copy of it. top_k = 2, so both always run and the router acts as a soft gate
σ((r_owner − r_public)·x + b). Trained: the owner's FFN, the owner's router row in every layer and a
per-layer bias b ≤ 0. Everything else — embeddings, attention, norms, lm_head, the public FFN and
the public router row — stays bit-identical to the anchor. The owner ships only the package.

Two recipes (`--recipe`):
- `paper`: FlexOlmo as published: the owner's data only, bias min(b, 0) starting at 0.
- `flexmoe` (default): the owner also learns to DECLINE public text. Public data is public, so the
  owner mixes public batches into training (`PublicNegatives`): on them only the owner's router row
  and bias learn, from the LM loss plus a gate objective −log p_public (cross-entropy of every
  layer's routing softmax toward the public expert); the owner's FFN gets no gradient from public
  text. The router rows learn at 30× the FFN's rate. Where the family's merge keeps owners'
  biases the bias is b = −softplus(β), started negative, so it can never die at 0; where the
  merge drops them (the Mixtral row) b ≡ 0, so the FFN trains under the gate it is served with.
  Nothing of any other owner is used, so opt-out stays exact.

`--dense` instead continues pretraining the whole anchor on the owner's data: the "individual
expert" baseline needed for model soup, BTM and the no-coordination ablation.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch

from flexmoe.data.shards import TokenStream, shards_sha256
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError
from flexmoe.inference.bpb import evaluate_bpb
from flexmoe.lifecycle.anchor import open_streams
from flexmoe.lifecycle.dp import package_tensors, train_dp
from flexmoe.lifecycle.gate import (
    OWNER,
    PublicNegatives,
    Recipe,
    calibrate_gate,
    for_family,
    gate_loss,
    make_recipe,
)
from flexmoe.lifecycle.merge import build_merged
from flexmoe.lifecycle.router_init import (
    METHODS,
    document_statistics,
    embed_documents,
    hidden_rows,
    random_rows,
    rows_from_embedding,
    sample_documents,
)
from flexmoe.model.arch import family_of
from flexmoe.model.device import to_storage
from flexmoe.model.freezing import merge_owner_params, owner_only, parametrize_bias
from flexmoe.model.hidden import CENTROID_DOCS, centroid, hidden_layer
from flexmoe.model.lowrank import low_rank_owner, materialize
from flexmoe.model.moe import upcycle
from flexmoe.model.router import routers
from flexmoe.store.anchor_dir import load_anchor, write_anchor
from flexmoe.store.fsutil import guard_output
from flexmoe.store.package import (
    MAX_TEXT,
    PROTOTYPES,
    STATISTICS,
    USES,
    dp_record,
    tensor_sha256,
    validate_name,
    verify_package,
    write_package,
)
from flexmoe.store.records import library_versions
from flexmoe.train.loop import (
    TrainConfig,
    drop_checkpoints,
    make_train_config,
    train,
    unshard_for_save,
)


def expert_train_config(**overrides) -> TrainConfig:
    """Defaults for expert training at demo scale (AI2 at 7B: lr 9e-4, wd 0, clip 1)."""
    base = dict(
        steps=150,
        batch_size=16,
        seq_len=256,
        lr=2e-3,
        warmup=15,
        weight_decay=0.0,
        min_lr_ratio=0.1,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return make_train_config(**base)


def owner_router_rows(
    method: str,
    anchor,
    extras,
    tok,
    stream,
    seed: int,
    docs: int,
    seq_len: int,
    embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """(layers, hidden) initial router embedding for the owner."""
    cfg = anchor.config
    if method == "domain":
        if embedding is None:
            embedding = embed_documents(sample_documents(stream, tok, docs, seed))
        return rows_from_embedding(embedding, extras["projection"], cfg.num_hidden_layers)
    if method == "random":
        return random_rows(cfg.num_hidden_layers, cfg.hidden_size, seed + 1)
    if method == "hidden":
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, max(len(stream) - seq_len, 1), size=32)
        ids = torch.from_numpy(np.stack([stream.window(int(s), seq_len) for s in starts]))
        return hidden_rows(anchor, ids)
    raise FlexmoeError(f"unknown router init '{method}' (choose from {', '.join(METHODS)})")


def build_two_expert(anchor, extras, owner_rows: torch.Tensor, method: str):
    """The owner's 2-expert model: public row from the anchor, owner row from its own data."""
    model = upcycle(anchor, num_experts=2, top_k=2)
    public = extras[f"public.{method}"]
    for i, r in enumerate(routers(model)):
        with torch.no_grad():
            r.weight[0].copy_(public[i])
            r.weight[OWNER].copy_(owner_rows[i])
            r.bias.zero_()
    return model


def freeze_for_expert(
    model, train_bias: bool = True, owner_params: bool = True
) -> dict[str, torch.Tensor]:
    """requires_grad only on the owner's expert and router tensors. With owner_params (default)
    the owner's FFN and router rows are parameters of their own (model.owner_only): the public
    slices are buffers, outside the optimizer. The returned gradient masks freeze what remains
    shared: the public entry of the bias, and the bias itself when train_bias=False (the "no
    bias" ablation). owner_params=False is the old layout (every slice masked), kept for
    scripts/optimizer_memory.py's comparison."""

    if owner_params:
        owner_only(model, [OWNER])
    masks: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        trainable = ".mlp.experts." in name or ".mlp.gate." in name
        p.requires_grad_(trainable)
        if not trainable:
            continue
        is_bias = name.endswith("gate.bias") or "parametrizations.bias" in name
        if is_bias or not owner_params:
            m = torch.zeros_like(p)
            if train_bias or not is_bias:
                m[OWNER] = 1.0
            masks[name] = m
    return masks


def project_bias(model) -> None:
    """Keep b ≤ 0 as stored values too (the forward also clamps). A parametrized bias (b =
    −softplus(β)) is negative by construction and is left alone."""
    from torch.nn.utils import parametrize

    with torch.no_grad():
        for r in routers(model):
            if not parametrize.is_parametrized(r, "bias"):
                r.bias.clamp_(max=0.0)


def extract_package_tensors(model, statistics: dict[str, torch.Tensor] | None = None) -> dict:
    """The package's tensors from the owner's 2-expert model, plus the statistics of the owner's
    data it ships (STATISTICS: domain embedding, hidden centroid)."""
    tensors = {k: v.float() for k, v in (statistics or {}).items() if k in STATISTICS}
    inter = model.config.intermediate_size
    for i, layer in enumerate(model.model.layers):
        gate_up = layer.mlp.experts.gate_up_proj[OWNER].detach()
        tensors |= {
            f"layers.{i}.gate_proj": gate_up[:inter].clone(),
            f"layers.{i}.up_proj": gate_up[inter:].clone(),
            f"layers.{i}.down_proj": layer.mlp.experts.down_proj[OWNER].detach().clone(),
            f"layers.{i}.router": layer.mlp.gate.weight[OWNER].detach().clone(),
            f"layers.{i}.bias": layer.mlp.gate.bias[OWNER].detach().clone().reshape(()),
        }
    return tensors


def train_expert(
    anchor_dir: Path,
    data: Path,
    out: Path,
    name: str,
    heldout: Path | None = None,
    domain: str | None = None,
    owner: str = "unknown",
    licence: str = "unspecified",
    allowed_uses: list[str] | None = None,
    expires: dt.date | None = None,
    router_init: str = "domain",
    router_docs: int = 1000,
    dense: bool = False,
    train_bias: bool = True,
    resume: bool = False,
    eval_tokens: int = 131072,
    recipe: str | Recipe = "flexmoe",
    public: Path | None = None,
    overwrite: bool = False,
    restart: bool = False,
    dp: dict | None = None,
    rank: int | None = None,
    **overrides,
) -> dict:
    """Train an expert (or the dense baseline) and write its package (or dense model).

    `public`: token shards of public text (the anchor's public corpus or any public text), needed
    by a recipe with public negatives. `dp`: {"epsilon", "delta", "max_grad_norm", "epochs"}
    trains with DP-SGD (dp.py) instead. `rank`: train the owner's FFN as a rank-`rank` delta on
    the anchor's (model/lowrank.py). Every setting is checked before any work."""
    validate_name(name)
    if rank is not None and (rank < 1 or dense or dp is not None):
        raise FlexmoeError(
            "--rank must be ≥ 1" if rank < 1 else "--rank trains an expert package without DP"
        )
    if dp is not None:
        if dense:
            raise FlexmoeError("--dp-epsilon trains an expert package, not a dense model")
        recipe = make_recipe("paper")
        if not 0 < float(dp.get("epsilon", 0)) <= 100:
            raise FlexmoeError("--dp-epsilon must be in (0, 100]")
    out = guard_output(
        out,
        "dense expert" if dense else "expert package",
        [anchor_dir, data, heldout, public],
        overwrite,
    )
    for what, text in (("--domain", domain or name), ("--owner", owner), ("--licence", licence)):
        if not 1 <= len(text) <= MAX_TEXT:
            raise FlexmoeError(f"{what} must be 1 to {MAX_TEXT} characters")
    if expires is not None and expires < dt.date.today():
        raise FlexmoeError(f"--consent-expires {expires.isoformat()} is already in the past")
    rec = recipe if isinstance(recipe, Recipe) else make_recipe(recipe)
    for use in allowed_uses or []:
        if use not in USES:
            raise FlexmoeError(f"unknown use '{use}' (choose from {', '.join(USES)})")
    anchor, record, extras = load_anchor(anchor_dir)
    tok = load_tokenizer(anchor_dir)
    rec = for_family(rec, family_of(anchor.config.model_type))
    if dp is None and not dense and (rec.public_ratio > 0 or rec.calibrate) and public is None:
        raise FlexmoeError(
            f"recipe '{rec.name}' trains the gate on public negatives: pass --public "
            "(public token shards), or use --recipe paper"
        )
    train_bias = train_bias and rec.bias != "none"
    if not dense:
        overrides.setdefault("router_z_loss", rec.router_z_loss)
        overrides.setdefault("router_lr_scale", rec.router_lr_scale)
    cfg = expert_train_config(eval_tokens=eval_tokens, **overrides)
    stream, evals = open_streams(data, anchor_dir, {"heldout": heldout} if heldout else None)
    tb = token_byte_lengths(tok)

    def heldout_bpb(m) -> float:
        return evaluate_bpb(
            lambda ids: m(ids).logits, evals["heldout"], tb, cfg.seq_len, max_tokens=cfg.eval_tokens
        )["bpb"]

    anchor_bpb = heldout_bpb(anchor) if heldout is not None else None
    work = Path(out).with_name(Path(out).name + ".train")
    if dense:
        res = _train_dense(
            anchor_dir, anchor, tok, extras, record, stream, cfg, work, evals, tb, out,
            name, domain, resume, restart, anchor_bpb,
        )  # fmt: skip
        if not res.get("stopped"):
            drop_checkpoints(work)
        return res
    if dp is None:
        # the owner's mean document embedding: router init, and request-level preselection later
        texts = sample_documents(stream, tok, router_docs, cfg.seed)
        statistics = document_statistics(texts, cfg.seed)
        embedding = statistics["domain_embedding"]
        statistics["hidden_centroid"] = centroid(anchor, tok, texts[:CENTROID_DOCS])
        owner_rows = owner_router_rows(
            router_init, anchor, extras, tok, stream, cfg.seed, router_docs, cfg.seq_len, embedding
        )
    else:  # DP: nothing computed from the owner's data outside the accountant (dp.py)
        embedding, statistics = None, {}
        owner_rows = extras[f"public.{router_init}"].clone()

    def build():
        m = build_two_expert(anchor, extras, owner_rows, router_init)
        if rec.bias == "softplus":
            parametrize_bias(m, [OWNER], rec.bias_init)
        elif rec.bias_init:
            for r in routers(m):
                with torch.no_grad():
                    r.bias[OWNER] = rec.bias_init
        if rank is not None:
            low_rank_owner(m, rank, OWNER, cfg.seed)
        return m

    model = build()
    dp_record = None
    if dp is not None:  # DP-SGD (dp.py): the paper's recipe under a privacy accountant
        result, dp_record, tensors = _train_dp(model, stream, dp, cfg, tok, embedding)
        if heldout is not None:
            with torch.no_grad():
                result["eval/heldout/bpb"] = heldout_bpb(model)
        calibration = None
    else:
        result, calibration, model = _train_owner(
            model,
            build,
            rec,
            cfg,
            stream,
            work,
            evals,
            tb,
            train_bias,
            public,
            resume,
            restart,
            name,
            heldout_bpb if heldout is not None else None,
        )
        if result.get("stopped") or model is None:
            return result
        tensors = extract_package_tensors(model, statistics)
    manifest = {
        "name": name,
        "domain": domain or name,
        "owner": owner,
        "licence": licence,
        "consent": {
            "allowed_uses": allowed_uses or list(USES),
            "expires": expires.isoformat() if expires else None,
        },
        "anchor_fingerprint": record["fingerprint"],
        "public_router_sha256": tensor_sha256(extras[f"public.{router_init}"]),
        "architecture": {
            "model_type": family_of(anchor.config.model_type).moe_type,
            "hidden_size": anchor.config.hidden_size,
            "intermediate_size": anchor.config.intermediate_size,
            "num_hidden_layers": anchor.config.num_hidden_layers,
            "hidden_act": anchor.config.hidden_act,
        },
        "router_init": router_init,
        "training": {
            "tokens": result["tokens"],
            "steps": result["step"],
            "seed": cfg.seed,
            "hyperparameters": cfg.model_dump(exclude={"stop_after"}),
            "heldout_bpb": result.get("eval/heldout/bpb"),
            "anchor_heldout_bpb": anchor_bpb,
            "final_loss": result["loss"],
            "seconds": result.get("seconds"),
            "tokens_per_s": result.get("tokens_per_s"),
            "router_docs": router_docs,
            "train_bias": train_bias,
            "low_rank": None
            if rank is None
            else {
                "rank": rank,
                "method": "the owner's FFN trained as anchor + B·A per matrix (model/lowrank.py)",
            },
            "recipe": rec.describe(),
            # a fingerprint, not data: lets whoever holds the shards rebuild what training read
            # (`flexmoe audit --trained-by`), and nobody else learn anything from it
            "data_sha256": shards_sha256(data),
            "public_data_sha256": (
                shards_sha256(public) if dp is None and rec.public_ratio > 0 else None
            ),
            "public_owner_gate": result.get("public/owner_gate"),
            "gate_calibration": calibration,
            "domain_embedding": None
            if embedding is None
            else (
                f"mean all-MiniLM-L6-v2 embedding of {router_docs} of the owner's documents (a "
                "statistic of the owner's data, used for request-level preselection)"
            ),
            "domain_prototypes": None
            if embedding is None
            else (
                f"{PROTOTYPES} k-means centres (seed {cfg.seed}) of the same documents' "
                "all-MiniLM-L6-v2 embeddings (a statistic of the owner's data, used for "
                "request-level preselection)"
            ),
            "hidden_centroid": None
            if embedding is None
            else (
                f"mean of the anchor's layer-{hidden_layer(anchor.config)} hidden states (each "
                f"token normalised, the first left out) over {min(router_docs, CENTROID_DOCS)} of "
                "the owner's documents (a statistic of the owner's data, used for request-level "
                "preselection)"
            ),
        },
        "created_with": library_versions(),
    }
    if dp_record is not None:
        manifest["training"]["dp"] = dp_record
        manifest["training"]["recipe"] = {
            "name": "paper+dp",
            "objective": "LM loss on the owner's documents with DP-SGD (dp.py); not calibrated",
        }
    m = write_package(Path(out), tensors, manifest)
    drop_checkpoints(work)
    return m.model_dump(mode="json")


def _train_owner(
    model,
    build,
    rec,
    cfg,
    stream,
    work,
    evals,
    tb,
    train_bias,
    public,
    resume,
    restart,
    name,
    heldout_bpb,
):
    """The non-DP owner training (shared loop) and, for the flexmoe recipe, gate calibration.
    Returns (result, calibration, model on CPU in the package layout)."""
    masks = freeze_for_expert(model, train_bias)
    negatives = None
    if rec.public_ratio > 0:
        rows = max(1, round(cfg.batch_size * rec.public_ratio))
        negatives = PublicNegatives(
            TokenStream(public), rows, cfg.seq_len, cfg.seed, rec.gate_weight
        )
    result = train(
        model,
        stream,
        cfg,
        work,
        eval_streams=evals,
        token_bytes=tb,
        grad_masks=masks,
        post_step=project_bias,
        pre_step=negatives,
        router_loss=(
            (lambda captured: rec.owner_gate_weight * gate_loss(captured, OWNER))
            if rec.owner_gate_weight
            else None
        ),
        resume=resume,
        restart=restart,
        progress_label=f"expert {name}",
    )

    def rebuild():
        m = build()
        freeze_for_expert(m)
        return m

    model = unshard_for_save(model, rebuild)
    if result.get("stopped") or model is None:
        return result, None, model
    to_storage(model)  # post-processing and the package: CPU, float32
    merge_owner_params(model)
    materialize(model)  # a low-rank owner: anchor + B·A in the stock tensors
    calibration = None
    if rec.calibrate:
        calibration = calibrate_gate(model, stream, TokenStream(public), rec, cfg.seq_len, cfg.seed)
        if heldout_bpb is not None:  # the package's held-out number is the calibrated model's
            result["eval/heldout/bpb"] = heldout_bpb(model)
    return result, calibration, model


def calibrate_package(
    anchor_dir: Path,
    package: Path,
    data: Path,
    public: Path,
    out: Path,
    recipe: Recipe | None = None,
    seq_len: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """`flexmoe expert calibrate`: fit an existing package's gate (calibrate_gate) on the owner's
    data and public data, without retraining its FFN; writes a new package."""

    guard_output(out, "expert package", [anchor_dir, package, data, public], overwrite)
    rec = recipe or make_recipe("flexmoe", calibrate=True)
    anchor, record, extras = load_anchor(anchor_dir)
    m, tensors = verify_package(package, record, extras, anchor)

    if dp_record(m) is not None:
        raise FlexmoeError(
            f"{package} was trained with DP: calibrating it on the owner's data would void its ε"
        )
    model = build_merged(anchor, record, extras, [(m, tensors)], top_k=2)  # = the owner's model
    report = calibrate_gate(model, TokenStream(data), TokenStream(public), rec, seq_len, seed)
    manifest = json.loads(m.model_dump_json(exclude={"tensors"}))
    manifest["training"]["gate_calibration"] = report | {
        "public_data_sha256": shards_sha256(public),
        "recalibrated": True,
    }
    manifest["created_with"] = library_versions()
    new = extract_package_tensors(model, tensors)
    return write_package(Path(out), new, manifest).model_dump(mode="json")


def add_centroid(
    anchor_dir: Path, package: Path, data: Path, out: Path, overwrite: bool = False
) -> dict:
    """`flexmoe expert centroid`: give a package trained before packages carried them its hidden
    centroid (model/hidden.py) and its MiniLM prototypes, from the same documents `expert train`
    would have used (the manifest's router_docs and seed); statistics it has and the weights are
    unchanged. Writes a new, unsigned package."""
    guard_output(out, "expert package", [anchor_dir, package, data], overwrite)
    anchor, record, extras = load_anchor(anchor_dir)
    m, tensors = verify_package(package, record, extras, anchor)
    if dp_record(m) is not None:
        raise FlexmoeError(
            f"{package} was trained with DP: a statistic of the owner's data computed outside "
            "the accountant would void its ε"
        )
    if m.compression is not None:
        raise FlexmoeError(f"{package} is compressed: add the centroid before `expert compress`")
    training = m.training.model_dump()
    docs, seed = int(training.get("router_docs") or 1000), int(training.get("seed") or 0)
    tok = load_tokenizer(anchor_dir)
    texts = sample_documents(TokenStream(data), tok, docs, seed)
    manifest = json.loads(m.model_dump_json(exclude={"tensors"}))
    new = dict(tensors)
    added = f"added after training from data {shards_sha256(data)[:16]}…"
    if "hidden_centroid" not in tensors:
        heads = texts[:CENTROID_DOCS]
        new["hidden_centroid"] = centroid(anchor, tok, heads).float()
        manifest["training"]["hidden_centroid"] = (
            f"mean of the anchor's layer-{hidden_layer(anchor.config)} hidden states (each token "
            f"normalised, the first left out) over {len(heads)} of the owner's documents (a "
            f"statistic of the owner's data, used for request-level preselection); {added}"
        )
    if "domain_prototypes" not in tensors and "domain_embedding" in tensors:
        new["domain_prototypes"] = document_statistics(texts, seed)["domain_prototypes"]
        manifest["training"]["domain_prototypes"] = (
            f"{PROTOTYPES} k-means centres (seed {seed}) of the all-MiniLM-L6-v2 embeddings of "
            f"{len(texts)} of the owner's documents (a statistic of the owner's data, used for "
            f"request-level preselection); {added}"
        )
    if new.keys() == tensors.keys():
        raise FlexmoeError(f"{package} already stores every statistic `expert centroid` adds")
    manifest["created_with"] = library_versions()
    return write_package(Path(out), new, manifest).model_dump(mode="json")


def _train_dense(
    anchor_dir, anchor, tok, extras, record, stream, cfg, work, evals, tb, out,
    name, domain, resume, restart, anchor_bpb,
) -> dict:  # fmt: skip
    """The dense baseline: every weight of the anchor trained on the owner's data (the paper's
    upper reference), written as a dense model directory."""
    model = anchor
    model.requires_grad_(True)
    result = train(
        model,
        stream,
        cfg,
        work,
        eval_streams=evals,
        token_bytes=tb,
        resume=resume,
        restart=restart,
        progress_label=f"dense expert {name}",
    )
    model = unshard_for_save(model, lambda: load_anchor(anchor_dir)[0])
    if result.get("stopped") or model is None:
        return result
    to_storage(model)
    rec = {
        "kind": "dense-expert",
        "name": name,
        "domain": domain or name,
        "anchor_fingerprint": record["fingerprint"],
        "source": "trained",
        "training": {
            **result,
            "config": cfg.model_dump(),
            "seed": cfg.seed,
            "anchor_heldout_bpb": anchor_bpb,
        },
        "libraries": library_versions(),
    }
    return write_anchor(model, tok, extras, Path(out), rec)


def _train_dp(model, stream, dp: dict, cfg, tok, embedding) -> tuple[dict, dict, dict]:
    """The paper's recipe under DP-SGD (dp.py). Returns (result, privacy record, tensors)."""
    t0 = time.perf_counter()
    dp_record = train_dp(
        model,
        stream,
        epsilon=dp["epsilon"],
        delta=dp.get("delta"),
        max_grad_norm=dp.get("max_grad_norm", 1.0),
        epochs=dp.get("epochs", 1),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        seed=cfg.seed,
        pad=tok.pad_token_id if tok.pad_token_id is not None else 0,
        device=cfg.device,
    )
    model.eval()
    tensors = package_tensors(model, embedding)
    result = {
        "tokens": dp_record["steps"] * dp_record["expected_batch_size"] * cfg.seq_len,
        "step": dp_record["steps"],
        "loss": dp_record["mean_train_loss"],
        "seconds": time.perf_counter() - t0,
    }
    return result, dp_record, tensors
