"""Upcycling: a dense anchor → its MoE sibling (flexmoe.model.arch) with every expert a copy of the
anchor's FFN."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import check_dense, moe_config
from flexmoe.model.router import install_routers


def upcycle(anchor: PreTrainedModel, num_experts: int, top_k: int) -> PreTrainedModel:
    """The anchor's MoE sibling (flexmoe.model.arch) whose every expert is a copy of the anchor's
    FFN; every other weight copied by name. Router rows start at zero: callers initialise them
    (domain embedding, random, hidden)."""

    keys = check_dense(anchor.config).keys
    cfg = moe_config(anchor.config, num_experts, top_k)
    with torch.device("meta"):
        model = check_dense(anchor.config).moe_class(cfg)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    src = anchor.state_dict()
    dst = {name: t.clone() for name, t in src.items() if ".mlp." not in name}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        gate_up = torch.cat([src[f"{p}.{keys.gate}"], src[f"{p}.{keys.up}"]], dim=0)
        dst[f"{p}.{keys.experts_gate_up}"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        down = src[f"{p}.{keys.down}"]
        dst[f"{p}.{keys.experts_down}"] = down.unsqueeze(0).repeat(num_experts, 1, 1)
        dst[f"{p}.{keys.router}"] = torch.zeros(num_experts, cfg.hidden_size)
    missing, unexpected = model.load_state_dict(dst, strict=False)
    tied = cfg.tie_word_embeddings
    missing = [
        m for m in missing if "rotary" not in m and not (tied and m.endswith("lm_head.weight"))
    ]
    if missing or unexpected:
        raise FlexmoeError(f"upcycle: state dict mismatch (missing {missing}, extra {unexpected})")
    if tied:
        model.tie_weights()
    return install_routers(model.float())
