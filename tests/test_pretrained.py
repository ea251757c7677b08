"""Pretrained anchors: import of a non-OLMo family (HF directory and GGUF), and the whole lifecycle
(expert, merge, opt-out, attribution, evaluation) on it with the model's own tokenizer.

The GGUF is written here with the `gguf` package the way llama.cpp's converter writes a Llama:
q/k rows permuted for its rope layout, FFN tensors quantised (Q8_0), the tokenizer as metadata.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import run_cli, sample_texts, write_jsonl
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.merged import experts_of


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def llama_dir(work, tok_dir):
    """A tiny pretrained-style Llama checkpoint (tied embeddings) with its own tokenizer."""
    out = work / "hf-llama"
    tok = load_tokenizer(tok_dir)
    model = tiny_llama(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def public_raw(work):
    path = work / "raw" / "public-llama.jsonl"  # with ids: owners pick router-tuning proxies
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = sample_texts("public", "train", 40)
    path.write_text(
        "".join(json.dumps({"id": f"pub-{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    return path


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path, model: LlamaForCausalLM, tok_dir) -> None:
    import gguf

    cfg = model.config
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tj["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges(merges)
    w.add_eos_token_id(0)
    w.add_pad_token_id(1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def q8(name, arr):
        data = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(b + "attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], nkv))
        w.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        q8(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        q8(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        q8(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_import_gguf(work, tok_dir, public_raw, capsys):
    src = load_tokenizer(tok_dir)
    model = tiny_llama(len(src), seed=3)
    gguf_file = work / "gguf" / "tiny-llama.Q8_0.gguf"
    gguf_file.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(gguf_file, model, tok_dir)
    out = work / "anchor-gguf"
    args = ["anchor", "import", "--gguf", gguf_file, "-o", out, "--public", public_raw]
    code, stdout, err = run_cli([*args, "--router-docs", "4"], capsys)
    assert code == 0, err
    assert "anchor (llama)" in stdout
    anchor, rec, _ = load_anchor(out)
    assert rec["source"] == "imported" and rec["architecture"] == "llama"
    assert rec["gguf"]["tensor_types"] == {"F32": 6 * 2 + 2, "Q8_0": 3 * 2}
    assert rec["gguf"]["dequantised_to"] == "float32"
    assert rec["moe_type"] == "mixtral"
    assert isinstance(anchor, LlamaForCausalLM) and anchor.config.tie_word_embeddings
    ids = torch.randint(2, len(src), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = anchor(ids).logits, model(ids).logits
    err_ = (got - want).abs().max().item()
    assert err_ < 0.05 * want.abs().max().item(), err_  # only the Q8_0 FFN rounding differs
    # the GGUF's own tokenizer came along and encodes like the original
    tok = load_tokenizer(out)
    text = "The café sells 日本 tea 🙂."
    assert tok(text)["input_ids"] == src(text)["input_ids"]
    AutoModelForCausalLM.from_pretrained(out)  # a normal safetensors checkpoint


def test_import_refuses_bad_input(work, public_raw, capsys):
    bad = work / "gguf" / "not-a.gguf"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    out = work / "anchor-bad"
    code, _, err = run_cli(
        ["anchor", "import", "--gguf", bad, "-o", out, "--public", public_raw], capsys
    )
    assert code == 2 and "GGUF" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    gpt2 = work / "hf-gpt2"
    gpt2.mkdir(exist_ok=True)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(["anchor", "import", gpt2, "-o", out, "--public", public_raw], capsys)
    assert code == 2 and "not supported (supported: OLMo-2" in err, err
    assert not out.exists()


def test_lifecycle_on_a_pretrained_llama(work, llama_dir, public_raw, capsys):
    """import → tokenize with the model's tokenizer → expert (flexmoe recipe) → merge (Mixtral)
    → exact opt-out, attribution, eval bpb, stock load."""
    from flexmoe.model.arch import family_of
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask
    from flexmoe.store.merged import load_merged

    anchor = work / "anchor-llama"
    code, _, err = run_cli(
        ["anchor", "import", llama_dir, "-o", anchor, "--public", public_raw, "--router-docs", "4"],
        capsys,
    )
    assert code == 0, err
    toks = {}
    for domain, split, n in [
        ("code", "train", 30),
        ("code", "heldout", 6),
        ("public", "train", 40),
    ]:
        raw = write_jsonl(
            work / "raw" / f"llama-{domain}-{split}.jsonl", sample_texts(domain, split, n)
        )
        toks[f"{domain}/{split}"] = work / "tokens-llama" / domain / split
        code, _, err = run_cli(
            ["data", "tokenize", raw, "--tokenizer", anchor, "-o", toks[f"{domain}/{split}"]],
            capsys,
        )
        assert code == 0, err
    pkg = work / "pkg-llama-code"
    common = [
        "--steps",
        "4",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--router-docs",
        "4",
    ]
    code, _, err = run_cli(
        [
            "expert", "train", "--anchor", anchor, "--data", toks["code/train"], "--public",
            toks["public/train"], "--heldout", toks["code/heldout"], "--name", "code", "-o", pkg,
            *common,
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["architecture"]["model_type"] == "mixtral"
    # the Mixtral row's merge drops router biases, so the owner trains with b ≡ 0 (bias "auto")
    tr = manifest["training"]
    assert tr["recipe"]["bias"] == "none" and tr["train_bias"] is False, tr["recipe"]
    # and, a pre-norm block, is not calibrated after training (calibrate "auto")
    assert tr["recipe"]["calibrate"] is False and tr["gate_calibration"] is None, tr["recipe"]
    from safetensors.torch import load_file

    biases = [t for k, t in load_file(pkg / "expert.safetensors").items() if k.endswith(".bias")]
    assert biases and all(float(b) == 0.0 for b in biases)
    merged = work / "merged-llama"
    code, _, err = run_cli(["merge", "--anchor", anchor, "--experts", pkg, "-o", merged], capsys)
    assert code == 0, err
    stock = AutoModelForCausalLM.from_pretrained(merged)
    assert type(stock) is family_of("llama").moe_class
    m = load_merged(merged)
    a, _, _ = load_anchor(anchor)
    ids = torch.randint(2, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), routing(m, mask=expert_mask(m, exclude=["code"])):
        out = m(ids).logits
    assert (out - a(ids).logits).abs().max().item() < 1e-5  # opt-out of the only expert = anchor
    code, stdout, err = run_cli(
        [
            "generate",
            "--model",
            merged,
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "6",
            "--attribution",
        ],
        capsys,
    )
    assert code == 0 and "code" in stdout, err
    code, stdout, err = run_cli(
        [
            "eval",
            "bpb",
            "--model",
            merged,
            "--data",
            work / "tokens-llama",
            "--seq-len",
            "32",
            "--max-tokens",
            "256",
        ],
        capsys,
    )
    assert code == 0 and "bpb" in (stdout + err).lower(), err
    # router tuning on proxies the owner picked from public text
    prox = work / "llama-proxies.json"
    owner_raw = work / "raw" / "llama-code-train.jsonl"
    code, _, err = run_cli(
        ["expert", "proxy", "--data", owner_raw, "--public", public_raw, "--out", prox, "--k", "3"],
        capsys,
    )
    assert code == 0, err
    tuned = work / "merged-llama-rt"
    code, stdout, err = run_cli(
        ["router-tune", "--model", merged, "--proxies", prox, "--public", public_raw, "-o", tuned,
         "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--public-docs", "2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rt = load_merged(tuned)
    assert type(rt) is family_of("llama").moe_class and experts_of(rt).router_tuned


def test_bpb_counts_bytes_for_byte_level_and_sentencepiece_vocabs(tok_dir, tmp_path):
    """Σ bytes of a text's tokens = its UTF-8 length, including tokens that hold part of a
    multi-byte character, for flexmoe's BPE, a BPE with a non-ASCII added token, and a
    SentencePiece-style vocab (▁ spaces, <0xNN> byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["naïve café — 日本語のテキスト 🙂🚀", "def f(x):\n    return x ** 2  # ½", "Ελληνικά"]
    tok = load_tokenizer(tok_dir)
    tok.add_tokens(["→arrow"])
    tb = token_byte_lengths(tok)
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert any("\ufffd" in tok.decode([i]) for i in ids) or t.isascii()  # partial chars occur
        assert int(tb[ids].sum()) == len(t.encode()), t
    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.normalizer = normalizers.Replace(" ", "\u2581")
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    sp.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>", *alphabet], show_progress=False
    )
    sp.train_from_iterator(sample_texts("public", "train", 50), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": []})
    tb = token_byte_lengths(fast)
    for t in texts:
        ids = fast(t, add_special_tokens=False)["input_ids"]
        assert fast.unk_token_id not in ids
        assert int(tb[ids].sum()) == len(t.encode()), (t, fast.convert_ids_to_tokens(ids))


def test_import_drops_remote_code_and_keeps_user_files(work, llama_dir, public_raw, capsys):
    """A config pointing at foreign code (auto_map, trust_remote_code) is imported without it;
    rerunning the import never deletes a file the user put inside the previous output."""
    import shutil

    src = work / "hf-llama-remote"
    shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg |= {"auto_map": {"AutoModelForCausalLM": "evil.Model"}, "trust_remote_code": True}
    (src / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(
        json.dumps(tcfg | {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
    )
    out = work / "anchor-remote"
    args = ["anchor", "import", src, "-o", out, "--public", public_raw, "--router-docs", "2"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "auto_map" in err and "trust_remote_code" in err  # the one-line note
    written = json.loads((out / "config.json").read_text())
    assert "auto_map" not in written and "trust_remote_code" not in written
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    _, rec, _ = load_anchor(out)
    assert {"auto_map", "trust_remote_code"} <= set(rec["config_keys_dropped"])

    (out / "NOTES.md").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "NOTES.md" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "NOTES.md").unlink()
    code, _, err = run_cli(args, capsys)  # a previous output with only flexmoe's files: replaced
    assert code == 0, err
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("mine")
    code, _, err = run_cli([*args, "--overwrite"], capsys)  # asked for: replaced
    assert code == 0 and not (out / "sub").exists(), err
