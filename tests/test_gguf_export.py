"""`flexmoe export gguf`, checked against llama.cpp itself (xllamacpp, the `flexmoe[llamacpp]`
extra): a tiny Llama anchor, two experts merged into a Mixtral-shaped model, exported whole and
with an expert excluded; llama.cpp's next-token log-probabilities and greedy continuations are
compared with flexmoe's model routed as the file is (token routing, no bias)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_package, run_cli, sample_texts
from flexmoe.data.tokenizer import load_tokenizer

xllamacpp = pytest.importorskip("xllamacpp")

from flexmoe.evaluation.llamacpp import AsExported, LlamaCpp, partial_tokens  # noqa: E402
from flexmoe.lifecycle.anchor import import_anchor  # noqa: E402
from flexmoe.lifecycle.merge import merge  # noqa: E402
from flexmoe.store.merged import load_model  # noqa: E402

# max |Δ log p| over llama.cpp's 8 most likely next tokens, f32 file and llama.cpp in f32 end to
# end (exact=True; seen: ~1e-5, the two sum in different orders)
F32_TOLERANCE = 1e-3
TEXTS = [
    "def fibonacci(n):\n    return n",
    "The council voted 7-2 on Tuesday.",
    "Solve 3x + 7 = 22 for x; x = 5.",
    "  indented\tand  spaced\n\nlines ’quoted’ é ü 中文 🙂",
]


def _tiny_anchor(work, tok_dir, family: str, seed: int):
    """A tiny Llama or Qwen3 with peaked logits (wide init), imported as an anchor."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = load_tokenizer(tok_dir)
    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    }[family]
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    hf = work / f"gguf-hf-{family}"
    model_cls(cfg).float().save_pretrained(hf)
    tok.save_pretrained(hf)
    public = work / "raw" / "public-gguf.jsonl"
    if not public.exists():
        public.parent.mkdir(parents=True, exist_ok=True)
        docs = sample_texts("public", "train", 12)
        public.write_text(
            "".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(docs))
        )
    out = work / f"gguf-{family}-anchor"
    import_anchor(hf, out, public, router_docs=4)
    return out


def _packages(work, anchor, moe_type: str, seeds: tuple[int, int]) -> list:
    arch = {"model_type": moe_type, "hidden_size": 64, "intermediate_size": 128}
    arch["num_hidden_layers"] = 2
    return [
        random_package(work / f"gguf-{moe_type}-{n}", anchor, n, seed=s, architecture=arch)
        for n, s in zip(("code", "math"), seeds, strict=True)
    ]


@pytest.fixture(scope="module")
def llama_anchor(work, tok_dir):
    return _tiny_anchor(work, tok_dir, "llama", seed=11)


@pytest.fixture(scope="module")
def merged(work, llama_anchor):
    out = work / "gguf-merged"
    pkgs = _packages(work, llama_anchor, "mixtral", (1, 2))
    # the biases kept (the Mixtral row drops them by default): the export must say it drops them
    merge(llama_anchor, pkgs, out, top_k=2, log=None, router_bias=True)
    return out


def test_the_mixtral_row_merges_without_router_biases(work, llama_anchor, merged, capsys):
    """By default a Llama-family merge has b = 0 (model.arch `router_bias`): the stock checkpoint
    is then the whole model, and the GGUF export drops nothing."""
    from flexmoe.model.router import routers
    from flexmoe.store.merged import MERGED, load_merged

    out = work / "gguf-merged-nobias"
    logged = []
    pkgs = [work / "gguf-mixtral-code", work / "gguf-mixtral-math"]  # the `merged` fixture's
    merge(llama_anchor, pkgs, out, top_k=2, log=logged.append)
    assert any("router biases dropped" in x for x in logged)
    assert json.loads((out / MERGED).read_text())["router_bias"] is False
    assert all(torch.equal(r.bias, torch.zeros_like(r.bias)) for r in routers(load_merged(out)))
    code, _, err = run_cli(["export", "gguf", out, "-o", work / "nb.gguf", "--type", "f32"], capsys)
    assert code == 0 and "router bias dropped" not in err, err


def _ids(model_dir):
    tok = load_tokenizer(model_dir)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _compare(model_dir, gguf, exclude=None, tol=F32_TOLERANCE, greedy=16):
    """Max |Δ log p| over llama.cpp's top tokens, and whether greedy continuations agree."""
    model = load_model(model_dir).float().eval()
    banned = partial_tokens(load_tokenizer(model_dir))
    cpp = LlamaCpp(gguf, threads=1, exact=True, banned=banned)
    worst, same = 0.0, True
    with AsExported(model, exclude=exclude) as fx:
        for ids in _ids(model_dir):
            top = cpp.next_logprobs(ids, 8)
            ref = fx.next_logprobs(ids)
            worst = max(worst, max(abs(v - float(ref[i])) for i, v in top.items()))
            if greedy:
                same &= cpp.greedy(ids, greedy) == fx.greedy(ids, greedy, banned)
    return worst, same


def test_merged_f32_matches_llamacpp(work, merged, capsys):
    out = work / "gguf" / "merged-f32.gguf"
    code, stdout, err = run_cli(["export", "gguf", merged, "-o", out, "--type", "f32"], capsys)
    assert code == 0, err
    assert "llama (3 experts, top-2, f32, pre-tokenizer gpt-2)" in stdout
    assert "router bias dropped" in err  # the packages carry a bias b < 0
    worst, same = _compare(merged, out)
    assert worst < F32_TOLERANCE, worst
    assert same


def test_excluded_expert_is_not_in_the_file(work, merged, capsys):
    import gguf

    full, sub = work / "gguf" / "all.gguf", work / "gguf" / "no-code.gguf"
    assert run_cli(["export", "gguf", merged, "-o", full, "--type", "f32"], capsys)[0] == 0
    code, stdout, err = run_cli(
        ["export", "gguf", merged, "-o", sub, "--type", "f32", "--exclude", "code"], capsys
    )
    assert code == 0, err
    assert "experts: public, math" in stdout
    r = gguf.GGUFReader(str(sub))
    assert r.get_field("llama.expert_count").contents() == 2
    assert r.get_field("llama.expert_used_count").contents() == 2
    assert r.get_field("flexmoe.experts").contents() == ["public", "math"]
    shapes = {t.name: tuple(t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, 128, 2)  # GGUF order: ne0 first
    # llama.cpp on the subset = flexmoe with the expert masked, and ≠ the whole model
    worst, same = _compare(merged, sub, exclude=["code"])
    assert worst < F32_TOLERANCE and same
    ids = _ids(merged)[0]
    banned = partial_tokens(load_tokenizer(merged))
    a, b = (LlamaCpp(f, threads=1, banned=banned).next_logprobs(ids) for f in (full, sub))
    assert max(abs(a[i] - b.get(i, -99.0)) for i in a) > 1e-2


def test_tokenizer_matches_llamacpp(work, merged, capsys):
    out = work / "gguf" / "tok.gguf"
    assert run_cli(["export", "gguf", merged, "-o", out, "--type", "f32"], capsys)[0] == 0
    cpp = LlamaCpp(out, threads=1)
    tok = load_tokenizer(merged)
    for text in TEXTS:
        assert cpp.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"], text


def test_dense_anchor_and_quantised_types(work, llama_anchor, merged, capsys):
    out = work / "gguf" / "anchor-f32.gguf"
    code, stdout, err = run_cli(
        ["export", "gguf", llama_anchor, "-o", out, "--type", "f32"], capsys
    )
    assert code == 0, err
    assert "llama (dense, f32" in stdout
    worst, same = _compare(llama_anchor, out)
    assert worst < F32_TOLERANCE and same
    sizes = {}
    for t in ("f32", "f16", "q8_0"):
        path = work / "gguf" / f"m-{t}.gguf"
        assert run_cli(["export", "gguf", merged, "-o", path, "--type", t], capsys)[0] == 0
        sizes[t] = path.stat().st_size
        if t != "f32":  # a sanity bound (a wrong layout is off by nats): this tiny model's
            # wide random weights magnify rounding; scripts/gguf_check.py measures the demo's
            worst, _ = _compare(merged, path, greedy=0)
            assert worst < {"f16": 0.1, "q8_0": 0.5}[t], (t, worst)
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_refusals_write_nothing(work, anchor_dir, merged, capsys):
    out = work / "gguf" / "refused.gguf"
    code, _, err = run_cli(["export", "gguf", anchor_dir, "-o", out], capsys)  # OLMo-2 row
    assert code == 2 and "no FlexOlmo architecture" in err and not out.exists()
    code, _, err = run_cli(["export", "gguf", merged, "-o", out, "--exclude", "nope"], capsys)
    assert code == 2 and "unknown expert" in err and not out.exists()
    code, _, err = run_cli(["export", "gguf", merged, "-o", out, "--type", "q4_k"], capsys)
    assert code == 2 and "--type" in err and not out.exists()
    code, _, err = run_cli(["export", "gguf", merged, "-o", out, "--exclude", "public"], capsys)
    assert code == 2 and "public" in err and not out.exists()
    # an existing file that is not a previous export survives; --overwrite replaces it
    mine = work / "gguf" / "mine.bin"
    mine.write_bytes(b"user data")
    code, _, err = run_cli(["export", "gguf", merged, "-o", mine], capsys)
    assert code == 2 and "refusing to replace" in err and mine.read_bytes() == b"user data"
    assert run_cli(["export", "gguf", merged, "-o", mine, "--overwrite"], capsys)[0] == 0
    # a previous export is replaced without --overwrite
    assert run_cli(["export", "gguf", merged, "-o", mine, "--type", "q8_0"], capsys)[0] == 0
    assert not list(mine.parent.glob(".mine.bin.tmp-*"))


def test_card_inside_the_file_names_only_exported_experts(work, merged, capsys):
    import gguf
    import yaml

    out = work / "gguf" / "card.gguf"
    assert run_cli(["export", "gguf", merged, "-o", out, "--exclude", "code"], capsys)[0] == 0
    r = gguf.GGUFReader(str(out))
    card = r.get_field("flexmoe.model_card").contents()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert [e["name"] for e in front["flexmoe"]["experts"]] == ["math"]
    assert "code owner" not in card and "math owner" in card
    assert "gguf" in front["tags"] and r.get_field("general.license").contents() == "other"


@pytest.fixture(scope="module")
def qwen3(work, tok_dir):
    """A tiny Qwen3 anchor and a 3-expert Qwen3-MoE merge (top-2)."""
    anchor = _tiny_anchor(work, tok_dir, "qwen3", seed=12)
    out = work / "gguf-qwen3-merged"
    merge(anchor, _packages(work, anchor, "qwen3_moe", (3, 4)), out, top_k=2, log=None)
    return anchor, out


def test_qwen3_anchor_and_merge(work, qwen3, capsys):
    anchor, merged_q = qwen3
    out = work / "gguf" / "qwen3-anchor.gguf"
    code, stdout, err = run_cli(["export", "gguf", anchor, "-o", out, "--type", "f32"], capsys)
    assert code == 0 and "qwen3 (dense" in stdout, err
    worst, same = _compare(anchor, out)
    assert worst < F32_TOLERANCE and same
    # top-2 of 3: llama.cpp's qwen3moe would renormalise, flexmoe's does not → refused
    bad = work / "gguf" / "qwen3-all.gguf"
    code, _, err = run_cli(["export", "gguf", merged_q, "-o", bad], capsys)
    assert code == 2 and "renormalises" in err and not bad.exists()
    # public + code at top-2: every token uses both, the two rules agree
    out = work / "gguf" / "qwen3-code.gguf"
    args = ["export", "gguf", merged_q, "-o", out, "--type", "f32", "--include", "code"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "qwen3moe (2 experts, top-2" in stdout, err
    worst, same = _compare(merged_q, out, exclude=["math"])
    assert worst < F32_TOLERANCE and same
