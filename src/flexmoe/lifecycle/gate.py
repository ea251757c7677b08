"""How an owner's gate learns to decline text that is not the owner's (flexmoe's recipe).

In the owner's 2-expert model the router is a soft gate between the public expert (index 0) and
the owner's (index 1). The paper trains it on the owner's data only, so it learns "my expert beats
the public one on my data" but never "decline what is not mine"; after merging, every expert then
claims generic text. Public data is public, so an owner may use it to learn the second half:
- `PublicNegatives`: during training, public batches on which only the owner's router row and
  bias learn (LM loss + −log p_public); the owner's FFN gets no gradient from them;
- `calibrate_gate`: after training, each layer's owner row and bias are fitted as a classifier
  "owner's text vs public text" on what that router sees (method "classifier"), or all layers'
  owner rows together with the language-modelling loss of the owner's model in the loop
  (method "lm"): on a pre-norm block the gate scales what the FFN adds to the residual stream,
  so only a fit that sees the LM loss can tell a useful re-weighting from a harmful one.
Nothing of any other owner is read, so the exact opt-out guarantee is unchanged.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, ValidationError

from flexmoe.data.shards import TokenStream
from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import Family, family_of
from flexmoe.model.router import capture_router_logits, routers
from flexmoe.train.loop import dist_info

PUBLIC = 0  # the public expert's index in the owner's 2-expert model
OWNER = 1  # the owner's


class Recipe(BaseModel):
    """How an expert learns to share the router with the public expert (see module doc)."""

    name: Literal["flexmoe", "paper"]
    bias: Literal["auto", "softplus", "clamp", "none"] = Field(
        description="b = −softplus(β) | the paper's min(b,0) | b ≡ 0, not trained | auto: "
        "softplus where the family's merge keeps the bias, none where it drops it (model/arch.py)"
    )
    bias_init: float = Field(le=0, description="b at step 0")
    public_ratio: float = Field(ge=0, le=4, description="public sequences per owner sequence")
    gate_weight: float = Field(ge=0, description="weight of −log p_public on public tokens")
    owner_gate_weight: float = Field(
        0.0, ge=0, description="weight of −log p_owner on the owner's tokens"
    )
    router_z_loss: float = Field(0.0, ge=0)
    router_lr_scale: float = Field(1.0, gt=0, description="router rows and biases: lr × this")
    calibrate: bool | Literal["auto"] = Field(
        False,
        description="fit the gate after training (calibrate_gate) | auto: where the family's "
        "block normalises the FFN output (model/arch.py `post_norm`), not on pre-norm blocks",
    )
    calibrate_method: Literal["classifier", "lm"] = Field(
        "classifier",
        description="per-layer classifier on the router inputs | all owner rows fitted with the "
        "LM loss of the owner's model in the loop",
    )
    calibrate_windows: int = Field(32, gt=0, description="owner and public windows each")
    calibrate_public_weight: float = Field(
        1.0,
        ge=0,
        description="calibration: cost of a public token routed to the owner (classifier: "
        "relative to an owner token; lm: weight of −log p_public beside the LM loss)",
    )
    calibrate_steps: int = Field(60, gt=0, description="lm calibration: Adam steps")
    calibrate_lr: float = Field(1e-3, gt=0, description="lm calibration: Adam learning rate")
    calibrate_owner_target: Literal["owner", "trained"] = Field(
        "owner",
        description="calibration on the owner's tokens: push them to the owner's expert | keep "
        "the routing they had after training (only public text is re-routed)",
    )

    def describe(self) -> dict:
        d = self.model_dump()
        if self.public_ratio:
            d["gate_objective"] = (
                "on public tokens: LM loss + gate_weight · mean over layers of −log softmax(router"
                " logits)[public]; the owner's FFN gets no gradient from public tokens"
            )
        if self.owner_gate_weight:
            d["owner_gate_objective"] = (
                "on the owner's tokens: LM loss + owner_gate_weight · mean over layers of −log "
                "softmax(router logits)[owner]"
            )
        return d


def gate_loss(captured: list[list[torch.Tensor]], target: int) -> torch.Tensor:
    """Mean over layers of the routing cross-entropy toward expert `target`, from the routers'
    captured logits (detached inputs: only router rows and biases get its gradient)."""
    per_layer = [torch.cat(c) for c in captured]
    return torch.stack(
        [F.cross_entropy(c, torch.full_like(c[:, 0], target, dtype=torch.long)) for c in per_layer]
    ).mean()


RECIPES: dict[str, Recipe] = {
    # flexmoe's default: negatives during training, then (post-norm blocks: model/arch.py) the
    # gate calibrated with a public token routed to the owner costing 4× an owner token routed to
    # the public expert (README)
    # router_lr_scale 30: at 16 steps × lr 3e-4 the router rows barely move otherwise; with the
    # owner's FFN trained under the gate it is served with (bias "auto": b ≡ 0 on the Mixtral
    # row), SmolLM2's merged model is 1.7% [1.1, 2.4] better on the mean and each domain gives
    # its own expert 0.54–0.63 instead of 0.46–0.48 (results/calibration/demo-smollm2-train)
    "flexmoe": Recipe(
        name="flexmoe",
        bias="auto",
        bias_init=-1.0,
        router_lr_scale=30.0,
        public_ratio=0.25,
        gate_weight=1.0,
        owner_gate_weight=1.0,
        calibrate="auto",
        calibrate_public_weight=4.0,
    ),
    "paper": Recipe(name="paper", bias="clamp", bias_init=0.0, public_ratio=0.0, gate_weight=0.0),
}


def make_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise FlexmoeError(f"unknown recipe '{name}' (choose from {', '.join(RECIPES)})")
    base = RECIPES[name].model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        r = Recipe(**base)
    except ValidationError as e:
        err = e.errors()[0]
        raise FlexmoeError(f"recipe setting '{err['loc'][0]}': {err['msg']}") from None
    if r.bias in ("softplus", "auto") and r.bias_init >= 0:
        raise FlexmoeError("--bias-init must be < 0 with the softplus bias")
    if r.bias == "none" and r.bias_init != 0:
        raise FlexmoeError("--bias-init must be 0 when the bias is not trained (bias none)")
    return r


def for_family(r: Recipe, family: Family) -> Recipe:
    """The recipe an owner trains with on a family, the same recipe name on every family:
    bias "auto" becomes softplus where the merge keeps the owners' biases and b ≡ 0 where it drops
    them, so the FFN learns under the gate it will be served with (the row's `router_bias`);
    calibrate "auto" calibrates only where the block normalises the FFN output (`post_norm`)."""
    update: dict = {}
    if r.bias == "auto":
        update = {"bias": "softplus"} if family.router_bias else {"bias": "none", "bias_init": 0.0}
    if r.calibrate == "auto":
        update["calibrate"] = family.post_norm
    return r.model_copy(update=update) if update else r


class PublicNegatives:
    """pre_step hook: one public batch per step that teaches the owner's gate to decline it.

    The batch is a pure function of (seed, step), so resume stays exact. Only the owner's router
    row and bias learn from it: on one process the FFN weights' gradients are not even computed
    (requires_grad is off during the pass, the same result for less work); under FSDP they are
    computed and dropped.
    """

    skip_ffn_grads = True  # off only to compare with the compute-then-drop path (tests)

    def __init__(self, stream: TokenStream, rows: int, seq_len: int, seed: int, gate_weight: float):
        self.stream, self.rows, self.seq_len = stream, rows, seq_len
        self.seed, self.gate_weight = seed, gate_weight
        if len(stream) <= seq_len + 1:
            raise FlexmoeError(f"public data has {len(stream)} tokens; need > seq_len+1")

    def __call__(self, model, step: int, autocast) -> dict:
        rank, world = dist_info()
        rng = np.random.default_rng([self.seed, step, 0x9B1C])
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, size=self.rows)[rank::world]
        device = next(model.parameters()).device
        batch = torch.from_numpy(
            np.stack([self.stream.window(int(s), self.seq_len + 1) for s in starts])
        ).to(device)
        ffn = [p for n, p in model.named_parameters() if ".mlp.experts." in n and p.requires_grad]
        skip = self.skip_ffn_grads and world == 1  # FSDP2 keeps its own view of requires_grad
        for p in ffn if skip else ():
            p.requires_grad_(False)
        try:
            with capture_router_logits(model) as captured, autocast:
                logits = model(batch[:, :-1]).logits
            lm = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            gate = gate_loss(captured, PUBLIC)
            (lm + self.gate_weight * gate).backward()
        finally:
            for p in ffn if skip else ():
                p.requires_grad_(True)
        for p in ffn:
            p.grad = None  # the owner's FFN learns from the owner's data only
        owner = torch.stack([torch.cat(c).detach().softmax(-1)[:, OWNER].mean() for c in captured])
        return {
            "public/lm": float(lm.detach()),
            "public/gate_ce": float(gate.detach()),
            "public/owner_gate": float(owner.mean()),
        }


def _router_inputs(model, ids: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Per layer, the (tokens, hidden) residual stream entering the MoE block: what its router
    sees in the owner's model as trained (one pass, before any gate is changed)."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                model(ids[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in seen]


def _fit_gate(x_own, x_pub, w_pub, w0, b0: float, rec: Recipe, fit_bias: bool = True):
    """One layer of calibrate_gate: (row, β, objective before, objective after). Without
    fit_bias the gate is fitted at b = 0 (β = −∞, as the merge will serve it) and β is None."""
    w = w0.clone().requires_grad_(True)
    beta = torch.tensor(float(np.log(np.expm1(max(-b0, 1e-4)))), requires_grad=fit_bias)

    def bias() -> torch.Tensor:
        return -F.softplus(beta) if fit_bias else torch.zeros(())

    def logp(x, w, b):
        return torch.stack([x @ w_pub, x @ w + b], -1).log_softmax(-1)

    if rec.calibrate_owner_target == "trained":
        # the trained gate's mixing on the owner's tokens (as served)
        target = logp(x_own, w0, b0 if fit_bias else 0.0).exp()
    else:
        target = torch.zeros(len(x_own), 2).index_fill_(1, torch.tensor(OWNER), 1.0)

    def objective() -> torch.Tensor:
        return (
            -(target * logp(x_own, w, bias())).sum(-1).mean()
            - rec.calibrate_public_weight * logp(x_pub, w, bias())[:, PUBLIC].mean()
            + 1e-3 * (w - w0).square().sum()
        )

    opt = torch.optim.LBFGS(
        [w, beta] if fit_bias else [w], max_iter=100, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    before = float(objective().detach())
    opt.step(closure)
    return w.detach(), beta.detach() if fit_bias else None, before, float(objective().detach())


def calibrate_gate(
    model, owner: TokenStream, public: TokenStream, rec: Recipe, seq_len: int, seed: int
) -> dict:
    """Owner-side gate calibration after training, by the recipe's method: "classifier"
    (`calibrate_gate_classifier`) or "lm" (`calibrate_gate_lm`)."""
    if rec.calibrate_method == "lm":
        return calibrate_gate_lm(model, owner, public, rec, seq_len, seed)
    return calibrate_gate_classifier(model, owner, public, rec, seq_len, seed)


LM_ROWS = 4  # lm calibration: owner windows and public windows per step
LM_PROBE = 8  # lm calibration: owner and public windows scored before and after the fit


def _lm_windows(stream: TokenStream, rng: np.random.Generator, n: int, seq_len: int):
    starts = rng.integers(0, len(stream) - seq_len - 1, size=n)
    return torch.from_numpy(np.stack([stream.window(int(s), seq_len + 1) for s in starts]))


def _lm_terms(model, own: torch.Tensor, pub: torch.Tensor, autocast) -> dict:
    """One forward of the owner's model over owner and public windows: LM loss on each, the
    public-gate cross-entropy on public tokens, and per layer the owner's mean gate on each."""
    ids = torch.cat([own, pub])
    with capture_router_logits(model) as captured, autocast:
        logits = model(ids[:, :-1]).logits
    lm = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    cut = len(own) * (ids.shape[1] - 1)  # router rows are (batch · time) in row-major order
    logits_by_layer = [torch.cat(c) for c in captured]
    p = [c.detach().softmax(-1)[:, OWNER] for c in logits_by_layer]
    return {
        "lm_owner": lm[: len(own)].mean(),
        "lm_public": lm[len(own) :].mean(),
        "gate_public": gate_loss([[c[cut:]] for c in logits_by_layer], PUBLIC),
        "owner_gate_on_owner": [float(x[:cut].mean()) for x in p],
        "owner_gate_on_public": [float(x[cut:].mean()) for x in p],
    }


def calibrate_gate_lm(
    model, owner: TokenStream, public: TokenStream, rec: Recipe, seq_len: int, seed: int
) -> dict:
    """Fit every layer's owner router row (and bias, where the family keeps router biases) with
    the owner's 2-expert model's language-modelling loss in the loop:
      LM(owner windows) + LM(public windows) + calibrate_public_weight · mean_layers[−log p_public
      on public tokens]
    by Adam (calibrate_steps, calibrate_lr), LM_ROWS fresh seeded windows of each per step, bf16
    autocast. Unlike the classifier, a re-weighting that rescales what the FFN adds to the
    residual stream (pre-norm blocks) is paid for in the loss, and layers are fitted together, so
    each sees the routing of the layers below as it will be. Where the family drops router biases
    at merge (model.arch `router_bias`), the fit runs with b = 0, as the merged model will. The
    FFNs and the public row are untouched (checked); only the owner's data and public data are
    read, so opt-out stays exact."""
    from torch.nn.utils import parametrize

    rs = routers(model)
    keep_bias = family_of(model.config.model_type).router_bias
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    leaves = [r.weight for r in rs]
    if keep_bias:
        leaves += [
            r.parametrizations.bias.original if parametrize.is_parametrized(r, "bias") else r.bias
            for r in rs
        ]
    public_rows = [leaf.detach()[PUBLIC].clone() for leaf in leaves]
    used = [r.use_bias for r in rs]
    rng = np.random.default_rng([seed, 0xCA1, 1])
    probe = _lm_windows(owner, rng, LM_PROBE, seq_len), _lm_windows(public, rng, LM_PROBE, seq_len)
    history = []
    try:
        for r in rs:
            r.use_bias = keep_bias
        for leaf in leaves:
            leaf.requires_grad_(True)
        with torch.no_grad():
            before = _lm_terms(model, *probe, autocast)
        opt = torch.optim.Adam(leaves, lr=rec.calibrate_lr, betas=(0.9, 0.95))
        for step in range(rec.calibrate_steps):
            g = np.random.default_rng([seed, 0xCA1, 2, step])
            t = _lm_terms(
                model,
                _lm_windows(owner, g, LM_ROWS, seq_len),
                _lm_windows(public, g, LM_ROWS, seq_len),
                autocast,
            )
            loss = t["lm_owner"] + t["lm_public"] + rec.calibrate_public_weight * t["gate_public"]
            opt.zero_grad(set_to_none=False)
            loss.backward()
            for leaf in leaves:
                if leaf.grad is not None:
                    leaf.grad[PUBLIC] = 0.0  # the public row (and bias) never move
            opt.step()
            history.append(round(float(loss.detach()), 4))
        with torch.no_grad():
            for leaf, row in zip(leaves, public_rows, strict=True):
                if not torch.equal(leaf[PUBLIC], row):
                    raise FlexmoeError("gate calibration moved the public router row")
            after = _lm_terms(model, *probe, autocast)
    finally:
        for r, u in zip(rs, used, strict=True):
            r.use_bias = u
        for p, f in flags.items():
            p.grad = None
            p.requires_grad_(f)

    def summary(t: dict) -> dict:
        return {k: round(float(t[k]), 4) for k in ("lm_owner", "lm_public", "gate_public")} | {
            "owner_gate_on_owner": round(float(np.mean(t["owner_gate_on_owner"])), 4),
            "owner_gate_on_public": round(float(np.mean(t["owner_gate_on_public"])), 4),
        }

    return {
        "method": "lm",
        "objective": "LM(owner windows) + LM(public windows) + public_weight · mean over layers "
        "of −log p_public on public tokens, the owner's 2-expert model, Adam over every layer's "
        "owner router row" + (" and bias" if keep_bias else " (b = 0: the family drops biases)"),
        "steps": rec.calibrate_steps,
        "lr": rec.calibrate_lr,
        "rows_per_step": LM_ROWS,
        "seq_len": seq_len,
        "public_weight": rec.calibrate_public_weight,
        "router_bias": keep_bias,
        "probe_windows": LM_PROBE,
        "before": summary(before),
        "after": summary(after),
        "loss": history,
        "layers": [
            {
                "layer": i,
                "owner_gate_on_owner": after["owner_gate_on_owner"][i],
                "owner_gate_on_public": after["owner_gate_on_public"][i],
                "bias": float(r.bias[OWNER].detach()) if keep_bias else 0.0,
            }
            for i, r in enumerate(rs)
        ],
    }


def calibrate_gate_classifier(
    model, owner: TokenStream, public: TokenStream, rec: Recipe, seq_len: int, seed: int
) -> dict:
    """Owner-side gate calibration: after training, fit each layer's owner router row and bias
    as a classifier "owner's text vs public text" on what that router sees.

    The router inputs are read once from the owner's model as trained. Per layer it minimises,
    over the owner's row r and β (b = −softplus(β)) with full-batch L-BFGS,
      mean_owner[−log p_owner] + calibrate_public_weight · mean_public[−log p_public]
      + 1e-3 · ‖r − r_trained‖²
    where p = softmax(r_public·x, r·x + b). With calibrate_owner_target = "trained" the owner
    term is the cross-entropy to the trained gate's own p instead: the owner's FFN was trained
    under that mixing weight, and on a pre-norm block (Llama, Qwen3) moving it rescales what the
    FFN adds to the residual stream on the owner's own text. Where the family's merge drops the
    bias (model.arch `router_bias`) the row is fitted at b = 0 and the stored bias is left alone.
    The FFNs and the public row are untouched; only the owner's data and public data are read,
    so opt-out stays exact."""
    from torch.nn.utils import parametrize

    keep_bias = family_of(model.config.model_type).router_bias

    rng = np.random.default_rng([seed, 0xCA1])

    def windows(stream: TokenStream) -> torch.Tensor:
        starts = rng.integers(0, len(stream) - seq_len - 1, size=rec.calibrate_windows)
        return torch.from_numpy(np.stack([stream.window(int(s), seq_len) for s in starts]))

    xs_own, xs_pub = _router_inputs(model, windows(owner)), _router_inputs(model, windows(public))
    report = []
    for i, (r, x_own, x_pub) in enumerate(zip(routers(model), xs_own, xs_pub, strict=True)):
        w_pub = r.weight[PUBLIC].detach().float()
        w0 = r.weight[OWNER].detach().float()
        w, beta, before, after = _fit_gate(
            x_own, x_pub, w_pub, w0, float(r.bias[OWNER].detach()), rec, keep_bias
        )
        b = -F.softplus(beta) if keep_bias else torch.zeros(())
        with torch.no_grad():
            r.weight[OWNER] = w.to(r.weight.dtype)
            # where the family serves b = 0 the stored bias is not the calibration's to change
            if keep_bias and parametrize.is_parametrized(r, "bias"):
                r.parametrizations.bias.original[OWNER] = beta
            elif keep_bias:
                r.bias[OWNER] = b
            z_own = torch.stack([x_own @ w_pub, x_own @ w + b], -1).softmax(-1)
            z_pub = torch.stack([x_pub @ w_pub, x_pub @ w + b], -1).softmax(-1)
        report.append(
            {
                "layer": i,
                "objective_before": before,
                "objective_after": after,
                "owner_gate_on_owner": float(z_own[:, OWNER].mean()),
                "owner_gate_on_public": float(z_pub[:, OWNER].mean()),
                "bias": float(b),
            }
        )
    return {
        "method": "classifier",
        "objective": "per layer: mean_owner[cross-entropy(target, p)] + public_weight · "
        "mean_public[−log p_public] + 1e-3·‖r − r_trained‖², full-batch L-BFGS over the owner's "
        "row and β; target: the owner's expert (owner_target 'owner') or the trained gate's p "
        "('trained')",
        "windows": rec.calibrate_windows,
        "seq_len": seq_len,
        "public_weight": rec.calibrate_public_weight,
        "owner_target": rec.calibrate_owner_target,
        "router_bias": keep_bias,
        "layers": report,
    }
