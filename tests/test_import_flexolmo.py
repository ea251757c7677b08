"""`flexmoe import flexolmo`: a stock transformers FlexOlmo checkpoint split into an anchor and
expert packages merges back to the same function, its experts can be excluded exactly, and an
expert trained by flexmoe against the imported anchor joins them.

The checkpoints are tiny random `FlexOlmoForCausalLM(config).save_pretrained(dir)` with the test
tokenizer, router rows scaled up so that routing really depends on the input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM

from conftest import run_cli
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.import_flexolmo import RECORD, import_flexolmo
from flexmoe.lifecycle.merge import merge
from flexmoe.model.router import routers, routing
from flexmoe.selection import expert_mask
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.merged import load_merged, read_merged_meta
from flexmoe.store.package import read_manifest, verify_package

K = 2


def flexolmo_checkpoint(out: Path, tok_dir: Path, experts: int, seed: int, **config) -> Path:
    """A tiny random stock FlexOlmo checkpoint written by transformers, with a tokenizer."""
    tok = load_tokenizer(tok_dir)
    cfg = FlexOlmoConfig(
        **{
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            "num_experts": experts,
            "num_experts_per_tok": min(K, experts),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
            **config,
        }
    )
    torch.manual_seed(seed)
    model = FlexOlmoForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(50)  # |r| ~ 1: routing depends on the token
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def ids(vocab: int, batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


@torch.no_grad()
def reference(ck: Path, x: torch.Tensor) -> torch.Tensor:
    """The checkpoint as stock transformers computes it."""
    stock = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    assert type(stock) is FlexOlmoForCausalLM
    return logits(stock, x)


def merged_of(imp: Path, out: Path, names: list[str] | None = None, extra=()) -> Path:
    rec = json.loads((imp / RECORD).read_text())
    pkgs = [imp / "experts" / n for n in (rec["experts"] if names is None else names)]
    merge(imp / "anchor", [*pkgs, *extra], out, top_k=rec["top_k"], preselect=0, log=None)
    return out


@pytest.fixture(scope="module")
def imports(work, tok_dir):
    """n → an imported n-expert checkpoint (built once per module)."""
    cache: dict[int, dict] = {}

    def get(n: int) -> dict:
        if n not in cache:
            tied = {"tie_word_embeddings": n == 3}  # both head layouts
            ck = flexolmo_checkpoint(work / f"flexolmo-{n}", tok_dir, n, seed=n, **tied)
            out = work / f"flexolmo-{n}-import"
            cache[n] = {"ck": ck, "out": out, "res": import_flexolmo(ck, out, ["research"]), "n": n}
        return cache[n]

    return get


@pytest.mark.parametrize("n", [3, 4])
def test_merge_back_reproduces_the_checkpoint(imports, work, n) -> None:
    imported = imports(n)
    ck, out, res = imported["ck"], imported["out"], imported["res"]
    assert res.num_experts == n and res.top_k == K and len(res.packages) == n - 1
    anchor, record, extras = load_anchor(out / "anchor")  # fingerprint checked
    assert record["flexolmo"]["num_experts"] == n and record["flexolmo"]["public_expert"] == 0
    assert record["rope_parameters"]["rope_theta"] == 100000.0
    for pkg, name in zip(res.packages, res.names, strict=True):
        m, t = verify_package(pkg, record, extras, anchor)
        assert m.name == name and m.owner == "unknown" and m.licence == "unspecified"
        assert m.consent.allowed_uses == ["research"] and m.training.tokens == 0
        src = m.training.model_extra["imported_from"]
        assert src["checkpoint"] == str(ck.resolve()) and src["expert_index"] == int(name[-1])
        assert "domain_embedding" not in t
        assert all(float(t[f"layers.{i}.bias"]) == 0.0 for i in range(2))

    merged = merged_of(out, work / f"flexolmo-{n}-merged")
    meta = read_merged_meta(merged)
    assert meta["top_k"] == K and meta["preselect"] is None
    model = load_merged(merged)
    assert not model.config.norm_topk_prob
    assert all(torch.equal(r.bias, torch.zeros(n)) for r in routers(model))
    x = ids(model.config.vocab_size)
    want = reference(ck, x)
    got = logits(model, x)
    delta = (got - want).abs().max().item()
    assert delta <= 1e-5, delta
    # the stock loader of the merged directory computes it too (flexmoe's bias is 0 here)
    stock = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert (logits(stock, x) - want).abs().max().item() <= 1e-5
    # not vacuous: the public expert alone (the anchor) is a different function
    assert (logits(anchor, x) - want).abs().max().item() > 1e-3


def test_fused_layout_imports_identically(imports, work) -> None:
    """A checkpoint stored with the in-memory fused expert tensors imports to the same parts."""
    from safetensors.torch import save_file

    imported = imports(3)
    ck = imported["ck"]
    fused = work / "flexolmo-fused"
    shutil.copytree(ck, fused)
    for f in fused.glob("*.safetensors"):
        f.unlink()
    stock = FlexOlmoForCausalLM.from_pretrained(ck, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in stock.state_dict().items() if k != "lm_head.weight"}
    assert stock.config.tie_word_embeddings  # the head is the embedding
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors")
    res = import_flexolmo(fused, work / "flexolmo-fused-import", ["research"])
    assert res.fingerprint == imported["res"].fingerprint
    for a, b in zip(res.packages, imported["res"].packages, strict=True):
        assert read_manifest(a).tensors == read_manifest(b).tensors


def test_excluding_an_imported_expert_equals_merging_without_it(imports, work) -> None:
    imported = imports(4)  # 3 experts stay after an exclusion: top-k 2 still has a choice
    out, names = imported["out"], imported["res"].names
    full = load_merged(merged_of(out, work / "flexolmo-4-full"))
    x = ids(full.config.vocab_size, seed=3)
    for gone in (names[0], names[-1]):
        rest = [n for n in names if n != gone]
        small = load_merged(merged_of(out, work / f"flexolmo-4-without-{gone}", rest))
        with routing(full, mask=expert_mask(full, exclude=[gone])):
            masked = logits(full, x)
        assert (masked - logits(small, x)).abs().max().item() <= 1e-6, gone
    assert (masked - logits(full, x)).abs().max().item() > 1e-4  # the exclusion matters


def test_imported_anchor_accepts_a_flexmoe_expert(imports, work, shards) -> None:
    """An expert trained by flexmoe against the imported anchor merges with the imported
    packages; opting it out gives back exactly the original checkpoint."""
    from flexmoe.lifecycle.expert import train_expert

    imported = imports(3)
    out = imported["out"]
    pkg = work / "flexolmo-3-code"
    train_expert(
        out / "anchor",
        shards["code/train"],
        pkg,
        "code",
        recipe="paper",
        steps=2,
        warmup=1,
        batch_size=2,
        seq_len=32,
        router_docs=4,
        allowed_uses=["research"],
    )
    merged = load_merged(merged_of(out, work / "flexolmo-3-with-code", extra=[pkg]))
    assert [n for n in read_merged_meta(work / "flexolmo-3-with-code")["experts"]] == [
        "public",
        *imported["res"].names,
        "code",
    ]
    x = ids(merged.config.vocab_size, seed=5)
    with routing(merged, mask=expert_mask(merged, exclude=["code"])):
        without = logits(merged, x)
    assert (without - reference(imported["ck"], x)).abs().max().item() <= 1e-5
    with_code = logits(merged, x)
    assert torch.isfinite(with_code).all() and (with_code - without).abs().max().item() > 1e-4


def test_refusals_write_nothing(work, tok_dir) -> None:
    base = flexolmo_checkpoint(work / "flexolmo-refuse", tok_dir, 3, seed=7)
    target = work / "refused"

    def refused(src: Path, match: str, uses=("research",), **kw) -> None:
        with pytest.raises(FlexmoeError, match=match) as e:
            import_flexolmo(src, target, list(uses), **kw)
        assert "\n" not in str(e.value)
        assert not target.exists()

    refused(base, "records no consent", uses=())
    refused(base, "unknown use", uses=("anything",))
    refused(base, "names gives 1", names=["only-one"])
    refused(base, "invalid expert name", names=["Bad Name", "ok"])
    refused(base, "reserved", names=["public", "ok"])
    one = flexolmo_checkpoint(work / "flexolmo-one", tok_dir, 1, seed=7)
    refused(one, "at least 2")
    norm = flexolmo_checkpoint(work / "flexolmo-norm", tok_dir, 3, seed=7, norm_topk_prob=True)
    refused(norm, "norm_topk_prob")
    notok = work / "flexolmo-notok"
    shutil.copytree(base, notok)
    (notok / "tokenizer.json").unlink()
    refused(notok, "tokenizer")
    dense = work / "not-flexolmo"
    shutil.copytree(base, dense)
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(cfg | {"model_type": "olmo2"}))
    refused(dense, "not a FlexOlmo checkpoint")
    refused(work / "nowhere", "not found")
    pickled = work / "flexolmo-pickle"
    shutil.copytree(base, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    refused(pickled, "no .safetensors")
    extra = work / "flexolmo-extra"
    shutil.copytree(base, extra)
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.shared.weight": torch.zeros(2)}, extra / "zz.safetensors")
    refused(extra, "not part of a FlexOlmo model")

    busy = work / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(FlexmoeError, match="non-empty"):
        import_flexolmo(base, busy, ["research"])
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    with pytest.raises(FlexmoeError, match="overlaps"):
        import_flexolmo(base, base / "out", ["research"])


def test_cli(work, tok_dir, capsys) -> None:
    ck = flexolmo_checkpoint(work / "flexolmo-cli", tok_dir, 3, seed=11)
    out = work / "flexolmo-cli-import"
    args = ["import", "flexolmo", ck, "-o", out, "--consent-use", "research"]
    code, stdout, err = run_cli([*args, "--names", "math,code", "--owner", "AI2"], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"anchor → {out / 'anchor'}")
    assert lines[1:3] == [
        f"expert 'math' → {out / 'experts' / 'math'}",
        f"expert 'code' → {out / 'experts' / 'code'}",
    ]
    assert "experts: 3" in lines[3] and lines[4] == "top-k: 2" and "--top-k 2" in lines[5]
    assert read_manifest(out / "experts" / "math").owner == "AI2"
    merge_back = lines[5].split("merge back: flexmoe ", 1)[1].replace("MERGED", str(work / "m"))
    code, _, err = run_cli(merge_back.split(), capsys)  # the printed command works as printed
    assert code == 0 and read_merged_meta(work / "m")["experts"] == ["public", "math", "code"], err

    code, _, err = run_cli(args, capsys)  # its own previous output: replaced
    assert code == 0, err
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["flexolmo-1", "flexolmo-2"]
    (out / "NOTES.md").write_text("mine")
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "NOTES.md" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0 and not (out / "NOTES.md").exists(), err

    code, _, err = run_cli(["import", "flexolmo", ck, "-o", work / "no-consent"], capsys)
    assert code == 2 and "--consent-use" in err and len(err.strip().splitlines()) == 1, err
    assert not (work / "no-consent").exists()
