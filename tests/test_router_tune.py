"""Router tuning: proxies are public ids only; tuning moves router weight/bias and nothing else;
the output is a merged dir marked router-tuned with top_k = all experts. Tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_package, run_cli, sample_texts
from flexmoe.data.shards import tokenize_to_shards
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.inference.bpb import bpb_by_domain, domain_streams
from flexmoe.lifecycle.merge import merge
from flexmoe.lifecycle.router_tune import (
    load_proxies,
    read_owner_texts,
    router_tune,
    select_proxies,
    write_proxies,
)
from flexmoe.model.dense import new_anchor, olmo2_config
from flexmoe.model.router import routers, routing
from flexmoe.selection import expert_mask, expert_names
from flexmoe.store.anchor_dir import write_anchor
from flexmoe.store.merged import BIAS, PUBLIC, experts_of, load_merged, read_merged_meta

NAMES = ["code", "math"]


def _package(out: Path, anchor_dir: Path, name: str, seed: int) -> Path:
    return random_package(out, anchor_dir, name, seed)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rt")
    public = [(f"pub-{i}", t) for i, t in enumerate(sample_texts("public", "train", 24, 400))]
    owner = sample_texts("code", "train", 8, 400)
    pub_path = root / "public.jsonl"
    pub_path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in public))
    owner_path = root / "owner.jsonl"
    owner_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in owner))
    tok = load_tokenizer(train_tokenizer([t for _, t in public], root / "tok", vocab_size=300))
    cfg = olmo2_config("tiny", len(tok), tok.eos_token_id, tok.pad_token_id)
    g = torch.Generator().manual_seed(1)
    h, n = cfg.hidden_size, cfg.num_hidden_layers
    extras = {"projection": torch.randn(h, 384, generator=g)}
    extras |= {f"public.{k}": torch.randn(n, h, generator=g) for k in ("domain", "hidden")}
    write_anchor(new_anchor(cfg, seed=0), tok, extras, root / "anchor", record={"kind": "anchor"})
    pkgs = [_package(root / f"pkg-{m}", root / "anchor", m, 10 + k) for k, m in enumerate(NAMES)]
    merge(root / "anchor", pkgs, root / "merged", top_k=1, log=None)
    return {"root": root, "public": public, "pub_path": pub_path, "owner": owner,
            "owner_path": owner_path, "merged": root / "merged"}  # fmt: skip


RT_ARGS = dict(steps=3, batch_size=4, seq_len=32, warmup=1, lr=5e-2, public_docs=6)


@pytest.fixture(scope="module")
def proxies(env) -> list[Path]:
    """Two owners' proxies files (the second hand-picked, to keep the test fast)."""
    ids = select_proxies(env["owner"], env["public"], k=3, seed=1)
    assert len(set(ids)) == 3 and set(ids) <= {i for i, _ in env["public"]}
    write_proxies(env["root"] / "p1.json", "p1", env["pub_path"], ids)
    write_proxies(env["root"] / "p2.json", "p2", env["pub_path"], ["pub-20", "pub-21", "pub-22"])
    return [env["root"] / "p1.json", env["root"] / "p2.json"]


@pytest.fixture(scope="module")
def tuned(env, proxies) -> Path:
    out = env["root"] / "tuned"
    router_tune(env["merged"], proxies, env["pub_path"], out, **RT_ARGS)
    return out


def test_proxy_cli_writes_public_ids_only(env, capsys) -> None:
    p = env["root"] / "cli-proxies.json"
    code, stdout, err = run_cli(
        ["expert", "proxy", "--data", env["owner_path"], "--public", env["pub_path"],
         "--out", p, "--k", "5"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rec = json.loads(p.read_text())
    public_ids = {i for i, _ in env["public"]}
    assert len(rec["ids"]) == 5 == len(set(rec["ids"])) and set(rec["ids"]) <= public_ids
    assert set(rec) == {"format", "owner", "public_source_sha256", "selection", "ids"}
    text = p.read_text()
    assert not any(t[:40] in text for t in env["owner"])  # no owner text leaves the owner
    assert load_proxies(p)["ids"] == rec["ids"]
    code, _, err = run_cli(
        ["expert", "proxy", "--data", env["owner_path"], "--public", env["pub_path"],
         "--out", p, "--k", "999"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--k" in err


def test_diverse_proxies_do_not_spend_the_budget_on_near_duplicates(env, capsys) -> None:
    """Six near-copies of one code document top the owner-likeness ranking: relevance selection
    spends most of the budget on them, diverse selection one slot (one cluster)."""
    base = env["owner"][0]  # public text that is a near-copy of owner-like text
    dups = [(f"dup-{i}", f"{base}\n# revision {i}") for i in range(6)]
    public = [*env["public"], *dups]
    rel = select_proxies(env["owner"], public, k=3, seed=0)
    div = select_proxies(env["owner"], public, k=3, seed=0, selection="diverse")
    assert sum(i.startswith("dup-") for i in rel) >= 2  # the test can tell them apart
    assert sum(i.startswith("dup-") for i in div) == 1
    assert len(set(div)) == 3 and set(div) <= {i for i, _ in public}
    assert select_proxies(env["owner"], public, k=3, seed=0, selection="diverse") == div
    p = env["root"] / "diverse.json"
    args = ["expert", "proxy", "--data", env["owner_path"], "--public", env["pub_path"], "--out", p]
    code, _, err = run_cli([*args, "--k", "3", "--selection", "diverse"], capsys)
    assert code == 0, err
    assert json.loads(p.read_text())["selection"] == "diverse"
    bad = env["root"] / "bad.json"
    code, _, err = run_cli([*args[:-1], bad, "--selection", "nearest"], capsys)
    assert code == 2 and "--selection" in err and not bad.exists()


def test_router_tune_changes_only_routers(env, tuned, capsys) -> None:
    before, after = load_merged(env["merged"]), load_merged(tuned)
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    router = {k for k in a if k.endswith((".mlp.gate.weight", ".mlp.gate.bias"))}
    assert changed and changed <= router  # every other tensor is bit-identical
    assert any(k.endswith(".weight") for k in changed)
    bias = load_file(tuned / BIAS)
    assert all((v <= 0).all() for v in bias.values())
    # marked router-tuned; top_k = number of experts
    n = after.config.num_experts
    assert experts_of(after).router_tuned and not experts_of(before).router_tuned
    assert after.config.num_experts_per_tok == n and all(r.top_k == n for r in routers(after))
    meta = read_merged_meta(tuned)
    rt = meta["router_tuned"]
    assert meta["top_k"] == n and rt["steps"] == 3 and rt["top_k_before"] == 1
    assert 3 <= rt["proxy_documents"] <= 6 and len(rt["proxies"]) == 2
    assert meta["experts"] == ["public", *NAMES]
    assert sorted(p.name for p in (tuned / "experts").iterdir()) == sorted(NAMES)
    code, _, err = run_cli(
        ["generate", "--model", tuned, "--prompt", "The", "--max-new-tokens", "2"], capsys
    )
    assert code == 0 and "router-tuned" in err


def test_router_tune_cli(env, proxies, capsys) -> None:
    out = env["root"] / "tuned-cli"
    args = ["router-tune", "--model", env["merged"], "--proxies", *proxies]  # P1 P2 after one flag
    args += ["--public", env["pub_path"], "-o", out, "--steps", "1", "--batch-size", "2"]
    code, stdout, err = run_cli([*args, "--seq-len", "16", "--public-docs", "2"], capsys)
    assert code == 0, err
    assert "router-tuned" in stdout and experts_of(load_merged(out)).router_tuned
    assert len(read_merged_meta(out)["router_tuned"]["proxies"]) == 2


def test_router_tune_rejects_foreign_proxies(env, capsys) -> None:
    bad = env["root"] / "bad.json"
    bad.write_text(json.dumps({"public_source_sha256": "0" * 64, "ids": ["pub-1"]}))
    args = ["router-tune", "--model", env["merged"], "--proxies", bad, "--public", env["pub_path"]]
    code, _, err = run_cli([*args, "-o", env["root"] / "never"], capsys)
    assert code == 2 and "different public file" in err
    assert not (env["root"] / "never").exists()
    with pytest.raises(FlexmoeError, match="neither"):
        read_owner_texts("no-such-domain")


def test_optout_comparison(env, tuned) -> None:
    root = env["root"] / "tokens"
    for d in ("public", "code"):
        src = env["root"] / f"{d}-heldout.jsonl"
        texts = sample_texts(d, "heldout", 4, 1500)
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tokenize_to_shards([src], root / d / "heldout", env["root"] / "tok")
    res = optout_comparison(env["merged"], tuned, root, max_tokens=128, seq_len=32)
    assert set(res) == {"untuned", "tuned"}
    for rows in res.values():
        assert set(rows) == {"none", *NAMES}
        assert all(set(r) == {"public", "code"} for r in rows.values())
        assert all(v > 0 and v == v for r in rows.values() for v in r.values())
    assert res["untuned"]["none"] != res["tuned"]["none"]


def optout_comparison(
    untuned_dir: Path,
    tuned_dir: Path,
    token_root: Path,
    split: str = "heldout",
    max_tokens: int = 65536,
    seq_len: int = 256,
    batch_size: int = 8,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per-domain BPB with each non-public expert excluded in turn, for both models.

    Returns {"untuned"|"tuned": {"none"|expert: {domain: bpb}}}. Only the un-tuned numbers are
    equal to merging without that expert; the tuned ones show what RT does to the opt-out.
    """

    streams = domain_streams(token_root, split)
    tb = token_byte_lengths(load_tokenizer(untuned_dir))
    models = {"untuned": load_merged(untuned_dir), "tuned": load_merged(tuned_dir)}
    names = expert_names(models["untuned"])
    if expert_names(models["tuned"]) != names:
        raise FlexmoeError("the tuned and un-tuned models have different experts")
    result: dict[str, dict[str, dict[str, float]]] = {}
    for label, model in models.items():
        rows = {}
        for excluded in [None, *(n for n in names if n != PUBLIC)]:
            mask = expert_mask(model, exclude=[excluded] if excluded else None)
            with routing(model, mask=mask):
                rows[excluded or "none"] = bpb_by_domain(
                    model, tb, streams, seq_len, max_tokens, batch_size
                )
        result[label] = rows
    return result
