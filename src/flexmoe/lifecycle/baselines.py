"""The paper's merging baselines, built from the same anchor and the same per-owner data budget.

- model soup: parameter average of the anchor and the dense experts (uniform, or weighted by
  each model's likelihood on a calibration sample of TRAINING data — never held-out data);
- BTM: an ensemble of the anchor and the dense experts whose per-input weights are
  softmax(−mean prefix NLL / τ), top-k kept and renormalised, mixing next-token distributions.
  Weights at position t use only tokens before t, so scoring stays causal and honest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError
from flexmoe.inference.bpb import evaluate_bpb
from flexmoe.lifecycle.expert import expert_train_config, owner_router_rows, project_bias
from flexmoe.lifecycle.merge import default_top_k
from flexmoe.model.arch import family_of
from flexmoe.model.moe import upcycle
from flexmoe.model.router import routers
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.merged import save_merged
from flexmoe.store.package import tensor_sha256, write_package
from flexmoe.store.records import library_versions
from flexmoe.train.loop import drop_checkpoints, resumable_step, train


@torch.no_grad()
def soup(models: Sequence[PreTrainedModel], weights: Sequence[float] | None = None):
    """Parameter average; weights default to uniform and are normalised to sum to 1."""
    if not models:
        raise FlexmoeError("model soup needs at least one model")
    w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise FlexmoeError("soup weights must be non-negative and not all zero")
    w = w / w.sum()
    states = [m.state_dict() for m in models]
    out = type(models[0])(models[0].config)
    avg = {
        k: sum(float(wi) * s[k].double() for wi, s in zip(w, states, strict=True)).to(v.dtype)
        for k, v in states[0].items()
    }
    out.load_state_dict(avg)
    return out.eval()


@torch.no_grad()
def likelihood_weights(
    models,
    calib: Sequence[TokenStream],
    token_bytes,
    seq_len: int,
    max_tokens: int = 16384,
    temperature: float = 1.0,
) -> list[float]:
    """softmax(−mean calibration NLL / T) per model, over a mix of training streams."""
    nll = []
    for m in models:
        losses = [
            evaluate_bpb(
                lambda ids, m=m: m(ids).logits, s, token_bytes, seq_len, max_tokens=max_tokens
            )["loss"]
            for s in calib
        ]
        nll.append(float(np.mean(losses)))
    return torch.softmax(-torch.tensor(nll) / temperature, 0).tolist()


class BTMEnsemble:
    """Branch-Train-Merge style output ensemble; callable as ids → log-probabilities."""

    def __init__(self, models: Sequence, top_k: int = 2, temperature: float = 0.1):
        if not models:
            raise FlexmoeError("BTM needs at least one model")
        self.models, self.top_k, self.temperature = list(models), top_k, temperature

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, max_elems: int = 1 << 28) -> torch.Tensor:
        """(B, T) → (B, T, V) log-probabilities, rows taken a few at a time so that the members'
        (rows, T, V) log-probabilities stay under about `max_elems` floats (lm-eval sends batches
        of 5-shot prompts: all at once, five members' full-vocabulary outputs need tens of GB)."""
        vocab = self.models[0].config.vocab_size
        rows = max(1, max_elems // (len(self.models) * ids.shape[1] * vocab))
        return torch.cat([self._ensemble(ids[i : i + rows]) for i in range(0, len(ids), rows)])

    def _ensemble(self, ids: torch.Tensor) -> torch.Tensor:
        logps = [F.log_softmax(m(ids).logits.float(), -1) for m in self.models]
        # NLL each model gave to the observed tokens; position t may only use tokens < t.
        tok_nll = torch.stack([-lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] for lp in logps])
        cum = torch.cat([torch.zeros_like(tok_nll[:, :, :1]), tok_nll.cumsum(-1)], dim=-1)
        count = torch.arange(ids.shape[1], dtype=cum.dtype).clamp(min=1)
        score = -(cum / count) / self.temperature  # (M, B, T); equal at t = 0 → uniform
        k = min(self.top_k, len(self.models))
        top, idx = score.topk(k, dim=0)
        w = torch.zeros_like(score).scatter(0, idx, torch.softmax(top, dim=0))
        out = None  # log Σ_m w_m p_m, one member at a time (no (M, B, T, V) temporaries)
        for lp, wm in zip(logps, torch.log(w.clamp(min=1e-30)), strict=True):
            lp.add_(wm[..., None])
            out = lp if out is None else torch.logaddexp(out, lp, out=out)
        return out


# ---------------------------------------------------------------- ablations
def package_from_dense(anchor_dir, dense_dir, data, out, name: str, router_docs: int = 200):
    """ "No coordinated training": a dense expert's FFNs (trained without the frozen anchor around
    them) packaged like an expert, with the domain-informed router row and b = 0."""
    from pathlib import Path

    anchor, record, extras = load_anchor(anchor_dir)
    dense, drec, _ = load_anchor(dense_dir)
    tok = load_tokenizer(anchor_dir)
    rows = owner_router_rows("domain", anchor, extras, tok, TokenStream(data), 0, router_docs, 256)
    sd = dense.state_dict()
    tensors = {}
    for i in range(dense.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        tensors |= {
            f"layers.{i}.gate_proj": sd[f"{p}.gate_proj.weight"],
            f"layers.{i}.up_proj": sd[f"{p}.up_proj.weight"],
            f"layers.{i}.down_proj": sd[f"{p}.down_proj.weight"],
            f"layers.{i}.router": rows[i],
            f"layers.{i}.bias": torch.zeros(()),
        }
    cfg = anchor.config
    tr = json.loads((Path(dense_dir) / "flexmoe_anchor.json").read_text())["training"]
    manifest = {
        "name": name,
        "domain": name,
        "owner": "ablation",
        "licence": "see DATA_CARD",
        "consent": {"allowed_uses": ["research"]},
        "anchor_fingerprint": record["fingerprint"],
        "public_router_sha256": tensor_sha256(extras["public.domain"]),
        "architecture": {
            "model_type": family_of(cfg.model_type).moe_type,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
        },
        "router_init": "domain",
        "training": {
            "tokens": tr["tokens"],
            "steps": tr["step"],
            "seed": tr["seed"],
            "hyperparameters": tr["config"],
            "note": "FFNs of a dense expert",
        },
    }
    return write_package(Path(out), tensors, manifest)


def train_unrestricted(
    anchor_dir, data: dict, out, router_docs: int = 200, pool: dict | None = None, **overrides
):
    """Unrestricted MoE: the anchor upcycled to 1+N experts (domain-initialised router rows) and
    trained on ALL data jointly, every parameter free. The real setting forbids it (data would
    have to be pooled); it is the upper-bound reference. `data` maps expert name → shard dir;
    `pool` (name → shard dir) adds data to the training stream without an expert of its own
    (the public data, whose expert is the anchor's FFN: the paper pools it too).
    It is the longest stage of a results run: with `ckpt_every` set, a run stopped part-way
    continues from its last checkpoint when the settings are the same (else it starts again)."""
    from pathlib import Path

    anchor, record, extras = load_anchor(anchor_dir)
    tok = load_tokenizer(anchor_dir)
    names = ["public", *data]
    model = upcycle(anchor, len(names), default_top_k(len(names)))
    rows = [extras["public.domain"]] + [
        owner_router_rows("domain", anchor, extras, tok, TokenStream(d), 0, router_docs, 256)
        for d in data.values()
    ]
    with torch.no_grad():
        for i, r in enumerate(routers(model)):
            r.weight.copy_(torch.stack([x[i] for x in rows]))
    model.requires_grad_(True)
    cfg = expert_train_config(**overrides)
    pool = pool or {}
    stream = TokenStream.concat([*data.values(), *pool.values()])
    train_dir = Path(str(out) + ".train")
    start = resumable_step(train_dir, cfg)
    resume = start is not None
    result = train(
        model,
        stream,
        cfg,
        train_dir,
        post_step=project_bias,
        token_bytes=token_byte_lengths(tok),
        progress_label="unrestricted MoE",
        resume=resume,
        restart=not resume,
    )
    if result.get("stopped"):
        return result
    meta = {
        "format": "flexmoe-merged",
        "schema_version": 1,
        "experts": names,
        "anchor_fingerprint": record["fingerprint"],
        "top_k": model.config.num_experts_per_tok,
        "router_init": "domain",
        "manifests": {},
        "unrestricted": {
            "tokens": result["tokens"],
            "steps": result["step"],
            "pool": [*data, *pool],
            "config": cfg.model_dump(exclude={"stop_after"}),
        },
        "libraries": library_versions(),
    }
    save_merged(Path(out), model, tok, meta, [])
    drop_checkpoints(train_dir)
    return {**result, "resumed_from_step": start or 0}
