"""DP-SGD expert training with Opacus: a formal (ε, δ) guarantee per owner DOCUMENT.

HF's fused FlexOlmo experts do not work with Opacus (per-sample gradients need per-sample-friendly
layers and per-sample inputs). For training only, each layer's 2-expert MoE is replaced by
`OwnerGateMLP`: the public FFN and router row as frozen buffers, the owner's FFN as three
`nn.Linear`s and the owner's router row plus bias as one `nn.Linear(H, 1)`. With 2 experts and
top-2 it computes exactly what the FlexOlmo block computes: softmax([r_pub·x, r_own·x + b]) mixing
the two FFNs (tested). Only those Linears train; everything else is frozen. Opacus clips per
document with ghost clipping (two backward passes; per-document gradient NORMS from activations and
output gradients, never the per-document gradients themselves): hooks mode would hold one gradient
copy per document, 64 × 80M floats = 20 GB for a SmolLM2 owner. Tested equal to clipping each
document's gradient by hand. After training the weights go back into the package layout.

Privacy unit: one document of the owner's data (the first seq_len+1 tokens of each document; a
longer document contributes only that window). Batches are Poisson-sampled over documents, each
document's gradient is clipped to `max_grad_norm`, Gaussian noise is added, and Opacus's RDP
accountant gives ε at the recorded δ. The recipe is the paper's (owner data only): public
negatives and gate calibration would touch the owner's data outside the accountant, so DP
packages are not calibrated. For the same reason the owner's router row starts as a copy of the
public row (a data-independent init) and the package ships no domain embedding: every tensor
in a DP package is a function of the noised gradients and public data only.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.model.device import resolve_device


class OwnerGateMLP(nn.Module):
    """The owner's 2-expert MoE block as per-sample-friendly layers (see the module docstring)."""

    def __init__(self, mlp, owner: int = 1, public: int = 0):
        super().__init__()
        e, r = mlp.experts, mlp.gate
        inter = e.gate_up_proj.shape[1] // 2
        hidden = e.gate_up_proj.shape[2]
        self.register_buffer("pub_gate_up", e.gate_up_proj[public].detach().clone())
        self.register_buffer("pub_down", e.down_proj[public].detach().clone())
        self.register_buffer("pub_row", r.weight[public].detach().clone())
        self.register_buffer("pub_bias", r.bias[public].detach().clone().reshape(()))
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.router = nn.Linear(hidden, 1, bias=True)
        with torch.no_grad():
            gu = e.gate_up_proj[owner]
            self.gate.weight.copy_(gu[:inter])
            self.up.weight.copy_(gu[inter:])
            self.down.weight.copy_(e.down_proj[owner])
            self.router.weight.copy_(r.weight[owner].unsqueeze(0))
            self.router.bias.copy_(r.bias[owner].clamp(max=0).reshape(1))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pub_logit = F.linear(x, self.pub_row.unsqueeze(0)) + self.pub_bias
        own_logit = self.router(x)
        p = torch.softmax(torch.cat([pub_logit, own_logit], -1).float(), -1).to(x.dtype)
        gate, up = F.linear(x, self.pub_gate_up).chunk(2, dim=-1)
        public = F.linear(self.act(gate) * up, self.pub_down)
        owner = self.down(self.act(self.gate(x)) * self.up(x))
        return p[..., :1] * public + p[..., 1:] * owner


def to_dp_model(model) -> None:
    """Swap every layer's MoE block for OwnerGateMLP; only the owner's Linears train."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp = OwnerGateMLP(layer.mlp)
        for p in layer.mlp.parameters():
            p.requires_grad_(True)


def package_tensors(model, domain_embedding: torch.Tensor | None = None) -> dict:
    """The package's tensors from a DP-trained model (bias projected to ≤ 0)."""
    out = {} if domain_embedding is None else {"domain_embedding": domain_embedding.float()}
    for i, layer in enumerate(model.model.layers):
        m = layer.mlp
        out |= {
            f"layers.{i}.gate_proj": m.gate.weight.detach().float().clone(),
            f"layers.{i}.up_proj": m.up.weight.detach().float().clone(),
            f"layers.{i}.down_proj": m.down.weight.detach().float().clone(),
            f"layers.{i}.router": m.router.weight.detach()[0].float().clone(),
            f"layers.{i}.bias": m.router.bias.detach()[0].clamp(max=0).float().clone().reshape(()),
        }
    return out


def documents(stream, seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(docs, seq_len+1) token windows, one per document (the first seq_len+1 tokens), and the
    loss mask (padding after a short document's end is not scored)."""
    eos = int(stream.index["eos_token_id"])
    ids = np.concatenate([np.asarray(a) for a in stream.arrays]).astype(np.int64)
    ends = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    rows, masks = [], []
    for s, e in zip(starts, ends, strict=True):
        doc = ids[s : e + 1][: seq_len + 1]
        if len(doc) < 2:
            continue
        row = np.full(seq_len + 1, pad, dtype=np.int64)
        row[: len(doc)] = doc
        m = np.zeros(seq_len, dtype=bool)
        m[: len(doc) - 1] = True
        rows.append(row)
        masks.append(m)
    if not rows:
        raise FlexmoeError("no documents in the owner's data")
    return torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks))


IGNORE = -100  # target of a padding position: not scored (PyTorch's ignore_index)


def dp_step(model, opt, criterion, x: torch.Tensor, m: torch.Tensor) -> float:
    """One DP-SGD step on Poisson-sampled documents `x` (B, T+1) with loss masks `m` (B, T): each
    document's loss is its mean over scored tokens, its gradient is clipped, noise is added by
    `opt.step()`. Returns the batch's mean loss (0 for an empty draw, a noise-only step)."""
    drawn = len(x)
    if drawn == 0:  # no document drawn: one unscored row gives a zero gradient, so the step
        x = x.new_zeros((1, x.shape[1]))  # adds noise only, as the accountant assumes (HF
        m = m.new_zeros((1, m.shape[1]))  # attention cannot run on an empty batch)
    opt.zero_grad(set_to_none=True)
    logits = model(x[:, :-1]).logits
    with warnings.catch_warnings():  # frozen inputs: Opacus's hooks fire on outputs
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        target = x[:, 1:].masked_fill(~m, IGNORE)
        loss = criterion(logits.float().flatten(0, 1), target.flatten(), shape=logits.shape[:2])
        loss.backward()
    opt.step()
    return float(loss.item()) if drawn else 0.0


def train_dp(
    model,
    stream,
    *,
    epsilon: float,
    delta: float | None,
    max_grad_norm: float,
    epochs: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    pad: int,
    log=None,
    device: str = "auto",
    physical_batch: int = 16,
) -> dict:
    """DP-SGD (Opacus, Poisson sampling over documents) on the owner's Linears, on `device`
    (model.device), at most `physical_batch` documents per forward pass (memory only: the
    guarantee and the update are the batch's); returns the privacy record for the manifest. The
    model is left on CPU."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader, TensorDataset

    if not 0 < epsilon <= 100:
        raise FlexmoeError("--dp-epsilon must be in (0, 100]")
    if max_grad_norm <= 0:
        raise FlexmoeError("--max-grad-norm must be > 0")
    docs, masks = documents(stream, seq_len, pad)
    n = len(docs)
    delta = delta if delta is not None else min(1e-5, 1.0 / (10 * n))
    if not 0 < delta < 1:
        raise FlexmoeError("--dp-delta must be in (0, 1)")
    torch.manual_seed(seed)
    to_dp_model(model)
    dev = resolve_device(device)
    model.to(dev)  # no experts implementation to choose: the MoE blocks are OwnerGateMLPs now
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(docs, masks), batch_size=min(batch_size, n), shuffle=True, generator=g
    )
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)  # secure RNG: see README
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, criterion, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=opt,
            criterion=nn.CrossEntropyLoss(ignore_index=IGNORE),
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="ghost",
        )
    steps, loss_sum, seen = 0, 0.0, 0
    for epoch in range(epochs):
        # a Poisson batch is processed `physical_batch` documents at a time, one noised step
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical_batch, optimizer=opt
        ) as physical:
            for x, m in physical:
                loss = dp_step(model, opt, criterion, x.to(dev), m.to(dev))
                loss_sum += loss * len(x)
                seen += len(x)
                if opt._is_last_step_skipped:  # the Poisson batch continues
                    continue
                with torch.no_grad():
                    for layer in model._module.model.layers:
                        layer.mlp.router.bias.clamp_(max=0.0)
                steps += 1
        if log:
            log(f"DP epoch {epoch + 1}/{epochs}: ε so far {engine.get_epsilon(delta):.2f}")
    spent = engine.get_epsilon(delta)
    model.cpu()
    return {
        "epsilon": spent,
        "target_epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": opt.noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "sampling_rate": 1 / len(loader) if len(loader) else math.nan,
        "steps": steps,
        "epochs": epochs,
        "documents": n,
        "expected_batch_size": min(batch_size, n),
        "accountant": "opacus rdp",
        "privacy_unit": f"one document (its first {seq_len + 1} tokens)",
        "sampling": "Poisson",
        "clipping": "per document, Opacus ghost clipping",
        "mean_train_loss": loss_sum / max(seen, 1),
        "opacus": _version("opacus"),
    }


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)
