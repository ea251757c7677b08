"""Anchor: training output is a stock HF checkpoint; import validates local OLMo-2 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Olmo2Config, Olmo2ForCausalLM

from conftest import run_cli
from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.inference.bpb import unigram_bpb
from flexmoe.model.dense import ROPE_THETA
from flexmoe.store.anchor_dir import RECORD, load_anchor


def test_trained_anchor_is_stock_loadable_and_recorded(anchor_dir, shards):
    model = AutoModelForCausalLM.from_pretrained(anchor_dir)
    assert model.config.model_type == "olmo2"
    assert model.config.rope_parameters["rope_theta"] == ROPE_THETA
    rec = json.loads((anchor_dir / RECORD).read_text())
    for key in ("fingerprint", "training", "libraries", "spec_hash"):
        assert key in rec
    tr = rec["training"]
    assert tr["step"] == 60 and tr["tokens"] > 0 and tr["seed"] == 0
    assert "eval/public/bpb" in tr and rec["libraries"]["torch"].startswith("2.13")
    m, rec2, extras = load_anchor(anchor_dir)
    assert rec2["fingerprint"] == rec["fingerprint"]
    assert set(extras) == {"projection", "public.domain", "public.hidden", "public.random"}


def test_anchor_learns_more_than_unigram(anchor_dir, shards):
    rec = json.loads((anchor_dir / RECORD).read_text())
    tok = load_tokenizer(anchor_dir)
    uni = unigram_bpb(
        TokenStream(shards["public/train"]),
        TokenStream(shards["public/heldout"]),
        token_byte_lengths(tok),
        max_tokens=65536,
        seq_len=64,
    )
    assert rec["training"]["eval/public/bpb"] < uni


def test_fingerprint_detects_tampering(work, anchor_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    from flexmoe.errors import FlexmoeError

    bad = work / "anchor-tampered"
    shutil.copytree(anchor_dir, bad)
    sd = {k: v.clone() for k, v in load_file(bad / "model.safetensors").items()}
    k = next(iter(sd))
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] += 1e-3
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FlexmoeError, match="fingerprint"):
        load_anchor(bad)


def _random_olmo2(path, rope=True):
    cfg = Olmo2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=0,
        pad_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
    )
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(cfg)
    model.save_pretrained(path)
    if not rope:
        raw = json.loads((path / "config.json").read_text())
        raw.pop("rope_parameters", None)
        raw.pop("rope_theta", None)
        (path / "config.json").write_text(json.dumps(raw))
    return model


def test_import_local_olmo2(work, tok_dir, shards, capsys):
    src = work / "hf-olmo2"
    model = _random_olmo2(src)
    out = work / "imported"
    code, stdout, err = run_cli(
        [
            "anchor",
            "import",
            src,
            "-o",
            out,
            "--tokenizer",
            tok_dir,
            "--public",
            shards["public/train"],
            "--router-docs",
            "4",
        ],
        capsys,
    )
    assert code == 0, err
    m, rec, _ = load_anchor(out)
    assert rec["source"] == "imported"
    assert m.config.rope_parameters["rope_theta"] == 250000.0  # kept, not reset to a default
    ids = torch.randint(0, 512, (2, 16))
    assert torch.equal(m(ids).logits, model.eval()(ids).logits)
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    "problem, expect",
    [
        ("no-rope", "no rope_theta"),
        ("wrong-type", "not supported (supported: OLMo-2"),
        ("pickle-only", "no .safetensors"),
        ("missing", "no config.json"),
    ],
)
def test_import_rejects(work, tok_dir, shards, capsys, problem, expect):
    src = work / f"bad-{problem}"
    if problem != "missing":
        _random_olmo2(src, rope=problem != "no-rope")
    if problem == "wrong-type":
        raw = json.loads((src / "config.json").read_text())
        raw["model_type"] = "gpt2"
        (src / "config.json").write_text(json.dumps(raw))
    if problem == "pickle-only":
        for f in src.glob("*.safetensors"):
            f.rename(f.with_suffix(".bin"))
    out = work / f"out-{problem}"
    code, _, err = run_cli(
        [
            "anchor",
            "import",
            src,
            "-o",
            out,
            "--tokenizer",
            tok_dir,
            "--public",
            shards["public/train"],
        ],
        capsys,
    )
    assert code == 2 and expect in err, err
    assert not out.exists()
