"""The architecture table (flexmoe.model.arch): every row on tiny random weights.

For each dense family: the 1- and 2-expert upcycles compute the dense model's logits, a merged
model saved as a stock checkpoint loads in stock AutoModelForCausalLM as the row's MoE class and
computes what flexmoe's router computes (so each row's renormalisation matches its class), masks
equal a merge of the subset, and unsupported architectures are one-line errors.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen3Config,
)

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import FAMILIES, check_dense, family_of
from flexmoe.model.dense import olmo2_config
from flexmoe.model.moe import upcycle
from flexmoe.model.router import routers, routing
from flexmoe.store.merged import stock_state_dict

V = 320


def tiny_config(kind: str):
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=1,
    )
    if kind == "olmo2":
        return olmo2_config("tiny", V, 0, 1)
    if kind == "llama":  # SmolLM2's shape family: tied embeddings, GQA, rope θ 1e5
        return LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if kind == "qwen3":  # head_dim ≠ hidden/heads, as in real Qwen3
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    raise ValueError(kind)


KINDS = ["olmo2", "llama", "mistral", "qwen3"]


def dense_model(kind: str, seed: int = 0):
    cfg = tiny_config(kind)
    fam = family_of(cfg.model_type)
    torch.manual_seed(seed)
    model = fam.dense_class(cfg.model_type)(cfg).float().eval()
    with torch.no_grad():  # norms away from 1 so a dropped norm weight would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


IDS = torch.randint(2, V, (3, 24), generator=torch.Generator().manual_seed(0))


def test_every_row_of_the_table_is_tested():
    assert {t for f in FAMILIES for t in f.dense_types} == {"olmo2", "llama", "mistral", "qwen3"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("experts", [1, 2])
def test_upcycle_equals_the_dense_model(kind, experts):
    dense = dense_model(kind)
    moe = upcycle(dense, experts, experts).eval()
    assert type(moe) is family_of(kind).moe_class
    with torch.no_grad():
        want, got = dense(IDS).logits, moe(IDS).logits
    assert (got - want).abs().max().item() <= 1e-5


def _perturbed_merge(kind: str, n: int = 3, k: int = 2):
    """An n-expert MoE with distinct experts and router rows (what a merge produces)."""
    dense = dense_model(kind)
    moe = upcycle(dense, n, k).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, r in zip(moe.model.layers, routers(moe), strict=True):
            e = layer.mlp.experts
            e.gate_up_proj.add_(torch.randn(e.gate_up_proj.shape, generator=g) * 0.05)
            e.down_proj.add_(torch.randn(e.down_proj.shape, generator=g) * 0.05)
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))
    return dense, moe


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_loads_in_stock_transformers(kind, tmp_path):
    _, moe = _perturbed_merge(kind)
    moe.save_pretrained(tmp_path, state_dict=stock_state_dict(moe))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(stock) is family_of(kind).moe_class
    assert stock.config.model_type == family_of(kind).moe_type
    with torch.no_grad():  # bias 0: flexmoe's router = the stock router, renormalisation included
        assert (stock(IDS).logits - moe(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_renormalisation_follows_the_row(kind):
    fam = family_of(kind)
    _, moe = _perturbed_merge(kind)
    assert all(r.norm_topk_prob is fam.renormalize for r in routers(moe))
    with routing(moe, record=True) as rec, torch.no_grad():
        moe(IDS)
    weights = rec[0][0][1]
    sums = weights.sum(-1)
    if fam.renormalize:
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    else:
        assert (sums < 1 - 1e-4).any()


@pytest.mark.parametrize("kind", KINDS)
def test_mask_equals_a_merge_of_the_subset(kind):
    """Exact opt-out on every row: masking expert 2 of 3 = the 2-expert model without it."""
    _, moe = _perturbed_merge(kind, n=3, k=2)
    dense = dense_model(kind)
    sub = upcycle(dense, 2, 2).eval()
    with torch.no_grad():
        for a, b, ra, rb in zip(
            sub.model.layers, moe.model.layers, routers(sub), routers(moe), strict=True
        ):
            a.mlp.experts.gate_up_proj.copy_(b.mlp.experts.gate_up_proj[:2])
            a.mlp.experts.down_proj.copy_(b.mlp.experts.down_proj[:2])
            ra.weight.copy_(rb.weight[:2])
        with routing(moe, mask=torch.tensor([True, True, False])):
            masked = moe(IDS).logits
        assert torch.equal(masked, sub(IDS).logits)


def test_unsupported_architectures_are_one_line_errors():
    with pytest.raises(FlexmoeError, match=r"'gpt2' is not supported \(supported: OLMo-2"):
        check_dense(GPT2Config())
    cfg = tiny_config("llama")
    cfg.attention_bias = True
    with pytest.raises(FlexmoeError, match="attention or MLP biases"):
        check_dense(cfg)
    with pytest.raises(FlexmoeError, match="must be a dense model"):
        check_dense(upcycle(dense_model("llama"), 2, 2).config)
