"""Merging and inference: exact opt-out, stock loadability, atomic and verified merges, consent,
attribution. Tiny untrained models with random (seeded) expert packages: seconds on a CPU."""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import random_package
from flexmoe.data.tokenizer import load_tokenizer, train_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.inference.generate import generate
from flexmoe.lifecycle.merge import build_merged, merge
from flexmoe.model.dense import new_anchor, olmo2_config
from flexmoe.model.router import routers, routing
from flexmoe.selection import expert_mask
from flexmoe.store.anchor_dir import load_anchor, write_anchor
from flexmoe.store.merged import BIAS, experts_of, load_merged
from flexmoe.store.package import WEIGHTS, verify_package

NAMES = ["code", "math", "news", "law"]
TEXT = " ".join(
    f"The {w} of {i} is {i * 7 % 13}; def f{i}(x): return x + {i}. Court rules {w}."
    for i, w in enumerate(["cat", "dog", "sum", "law", "fig", "sky", "map", "ink"] * 12)
)


def make_package(out: Path, anchor_dir: Path, name: str, seed: int, **manifest) -> Path:
    return random_package(out, anchor_dir, name, seed, **manifest)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    tok = load_tokenizer(train_tokenizer([TEXT] * 4, root / "tok", vocab_size=300))
    cfg = olmo2_config("tiny", len(tok), tok.eos_token_id, tok.pad_token_id)
    model = new_anchor(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    h, n = cfg.hidden_size, cfg.num_hidden_layers
    extras = {"projection": torch.randn(h, 384, generator=g)}
    extras |= {
        f"public.{k}": torch.randn(n, h, generator=g) for k in ("domain", "hidden", "random")
    }
    write_anchor(model, tok, extras, root / "anchor", record={"kind": "anchor"})
    pkgs = [
        make_package(root / f"pkg-{n}", root / "anchor", n, seed=10 + k)
        for k, n in enumerate(NAMES)
    ]
    res = merge(root / "anchor", pkgs, root / "full", log=None)
    return {
        "root": root,
        "anchor": root / "anchor",
        "pkgs": pkgs,
        "full": root / "full",
        "tok": tok,
        "res": res,
    }


@pytest.fixture(scope="module")
def full(env):
    return load_merged(env["full"])


@pytest.fixture(scope="module")
def verified(env):
    model, record, extras = load_anchor(env["anchor"])
    pk = {p.name[4:]: verify_package(p, record, extras, model.config) for p in env["pkgs"]}
    return model, record, extras, pk


def ids(seed: int, batch: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(2, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x, use_cache=False).logits


def test_merged_layout(env, full) -> None:
    assert env["res"].experts == ["public", *NAMES]
    assert experts_of(full).names == ["public", *NAMES]
    assert full.config.model_type == "flex_olmo"
    assert full.config.num_experts == 5 and full.config.num_experts_per_tok == 4
    assert full.config.norm_topk_prob is False
    bias = load_file(env["full"] / BIAS)
    assert bias["layers.0.bias"][0] == 0 and (bias["layers.0.bias"] <= 0).all()
    pkg = load_file(env["pkgs"][1] / WEIGHTS)
    e = full.model.layers[1].mlp.experts
    assert torch.equal(e.down_proj[2], pkg["layers.1.down_proj"])
    assert torch.equal(
        e.gate_up_proj[2][: pkg["layers.1.gate_proj"].shape[0]], pkg["layers.1.gate_proj"]
    )
    assert torch.equal(routers(full)[1].weight[2], pkg["layers.1.router"])


IMPLS = ["eager", "grouped_mm", "batched_mm"]  # every HF experts implementation that runs on CPU


@pytest.fixture(params=IMPLS)
def impl(request, full):
    full.set_experts_implementation(request.param)
    yield request.param
    full.set_experts_implementation("eager")


def test_mask_equals_merge_of_subset(env, full, verified, impl) -> None:
    """For every subset S (public + 2 or 3 of 4 packages): masking = merging S only, on every
    experts implementation (rows with fewer active experts than top-k included)."""
    anchor, record, extras, pk = verified
    x = ids(0)
    outs = []
    for r in (2, 3):
        for sub in itertools.combinations(NAMES, r):
            small = build_merged(anchor, record, extras, [pk[n] for n in sub])
            small.set_experts_implementation(impl)
            with routing(full, mask=expert_mask(full, include=list(sub))):
                got = logits(full, x)
            want = logits(small, x)
            assert (got - want).abs().max() <= 1e-6, sub
            outs.append(want)
            a = generate(full, env["tok"], "The cat", 6, include=list(sub))
            b = generate(small, env["tok"], "The cat", 6)
            assert a.token_ids == b.token_ids and a.text == b.text
    assert (outs[0] - outs[-1]).abs().max() > 1e-3  # experts matter: the check is not vacuous


def test_row_masks_equal_single_rows(full, impl) -> None:
    x = ids(1, batch=3)
    rows = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with routing(full, rows=rows):
        batched = logits(full, x)
    for b in range(3):
        with routing(full, mask=rows[b]):
            single = logits(full, x[b : b + 1])
        assert (batched[b] - single[0]).abs().max() <= 1e-6


@pytest.mark.parametrize("impl_name", IMPLS)
def test_excluded_expert_weights_never_read(env, impl_name) -> None:
    model = load_merged(env["full"])
    model.set_experts_implementation(impl_name)
    x = ids(2)
    mask = expert_mask(model, exclude=["math"])
    with routing(model, mask=mask):
        before = logits(model, x)
    with torch.no_grad():
        for layer, r in zip(model.model.layers, routers(model), strict=True):
            layer.mlp.experts.gate_up_proj[2] = float("nan")
            layer.mlp.experts.down_proj[2] = float("nan")
            r.weight[2] = float("nan")
            r.bias[2] = float("nan")
    with routing(model, mask=mask):
        after = logits(model, x)
    assert torch.isfinite(after).all() and torch.equal(before, after)
    g = generate(model, env["tok"], "The dog", 5, exclude=["math"], attribution=True)
    assert g.attribution["math"] == 0.0


def test_public_expert_exclusion(env, full) -> None:
    with pytest.raises(FlexmoeError, match="public"):
        expert_mask(full, exclude=["public"])
    m = expert_mask(full, exclude=["public"], allow_no_public=True)
    assert m.tolist() == [False, True, True, True, True]
    with pytest.raises(FlexmoeError, match="unknown"):
        expert_mask(full, include=["nope"])
    with pytest.raises(FlexmoeError, match="at least one"):
        expert_mask(full, exclude=["public", *NAMES], allow_no_public=True)
    with pytest.raises(FlexmoeError, match="public"):
        merge(env["anchor"], env["pkgs"][:1], env["root"] / "nopub", exclude=["public"], log=None)
    assert not (env["root"] / "nopub").exists()


def test_stock_transformers_loads_merged(env, full) -> None:
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(env["full"], dtype=torch.float32).eval()
    assert type(stock).__name__ == "FlexOlmoForCausalLM"
    x = ids(3)
    for r in routers(full):
        r.use_bias = False
    try:
        ours = logits(full, x)
    finally:
        for r in routers(full):
            r.use_bias = True
    assert (logits(stock, x) - ours).abs().max() <= 1e-5
    assert (logits(full, x) - ours).abs().max() > 0  # the bias does something
    with safe_open(env["full"] / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.endswith("gate.bias")]
    plain = env["root"] / "plain"  # a stock FlexOlmo dir: bias 0, generic names
    stock.save_pretrained(plain)
    m = load_merged(plain)
    assert experts_of(m).names == [f"expert_{i}" for i in range(5)]
    assert all((r.bias == 0).all() for r in routers(m))
    assert (logits(m, x) - ours).abs().max() <= 1e-5


def test_bad_package_aborts_without_writing(env) -> None:
    root = env["root"]
    bad = root / "pkg-bad"
    shutil.copytree(env["pkgs"][2], bad)
    t = {k: v.clone() for k, v in load_file(bad / WEIGHTS).items()}
    t["layers.0.down_proj"][0, 0] += 1.0
    save_file(t, bad / WEIGHTS)
    with pytest.raises(FlexmoeError, match="sha256"):
        merge(env["anchor"], [env["pkgs"][0], bad], root / "never", log=None)
    assert not (root / "never").exists()
    assert not list(root.glob(".never*"))
    with pytest.raises(FlexmoeError, match="unique"):
        merge(env["anchor"], [env["pkgs"][0], env["pkgs"][0]], root / "never", log=None)
    assert not (root / "never").exists()


def test_add_remove_equals_merge_from_scratch(env) -> None:
    root, p = env["root"], dict(zip(NAMES, env["pkgs"], strict=True))
    merge(env["anchor"], [p["code"], p["math"], p["news"]], root / "base", log=None)
    r = merge(
        env["anchor"],
        [],
        root / "edited",
        base=root / "base",
        add=[p["law"]],
        remove=["math"],
        log=None,
    )
    merge(env["anchor"], [p["code"], p["news"], p["law"]], root / "scratch", log=None)
    assert r.experts == ["public", "code", "news", "law"]
    for f in ("model.safetensors", BIAS):
        a, b = load_file(root / "edited" / f), load_file(root / "scratch" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FlexmoeError, match="remove"):
        merge(env["anchor"], [], root / "x", base=root / "base", remove=["law"], log=None)


def test_consent_policy_excludes_with_reason(env) -> None:
    root = env["root"]
    old = make_package(
        root / "pkg-old",
        env["anchor"],
        "old",
        seed=99,
        consent={"allowed_uses": ["research"], "expires": "2020-01-01"},
    )
    res = make_package(
        root / "pkg-res",
        env["anchor"],
        "res",
        seed=98,
        consent={"allowed_uses": ["research"], "expires": None},
    )
    logged: list[str] = []
    r = merge(
        env["anchor"],
        [env["pkgs"][0], old, res],
        root / "consent",
        use="commercial",
        log=logged.append,
    )
    assert r.experts == ["public", "code"]
    reasons = dict(r.excluded)
    assert "expired" in reasons["old"] and "commercial" in reasons["res"]
    assert any("old" in line for line in logged)
    r = merge(env["anchor"], [env["pkgs"][0], res], root / "consent", use="research", log=None)
    assert r.experts == ["public", "code", "res"]
    # consent is checked again at inference: an expert that has expired by now is masked
    m = load_merged(root / "consent")
    experts_of(m).manifests["res"].consent.expires = dt.date(2000, 1, 1)
    g = generate(m, env["tok"], "The", 3, attribution=True)
    assert g.attribution["res"] == 0.0 and g.excluded[0][0] == "res"


def test_attribution(env, full) -> None:
    g = generate(
        full,
        env["tok"],
        "The sky of 3",
        8,
        include=["code", "law"],
        attribution=True,
        per_layer=True,
    )
    assert len(g.token_ids) >= 1
    assert abs(sum(g.attribution.values()) - 1) < 1e-9
    assert g.attribution["math"] == g.attribution["news"] == 0.0
    assert g.attribution["public"] > 0
    assert len(g.per_layer) == full.config.num_hidden_layers
    for row in g.per_layer:
        assert abs(sum(row.values()) - 1) < 1e-9 and row["math"] == 0.0
    from flexmoe.model.router import current_mask

    assert current_mask(full).all()  # the request's mask does not leak into the next
    s1 = generate(full, env["tok"], "The", 6, temperature=1.0, top_p=0.9, seed=3)
    s2 = generate(full, env["tok"], "The", 6, temperature=1.0, top_p=0.9, seed=3)
    assert s1.token_ids == s2.token_ids


def test_cli_merge_and_generate(env) -> None:
    from typer.testing import CliRunner

    from flexmoe.cli import app

    out = env["root"] / "cli"
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "merge",
            "--anchor",
            str(env["anchor"]),
            "--experts",
            f"{env['pkgs'][0]},{env['pkgs'][1]}",
            "-o",
            str(out),
            "--top-k",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(out),
            "--prompt",
            "The cat",
            "--max-new-tokens",
            "4",
            "--exclude",
            "math",
            "--attribution",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "code" in r.output and "math" in r.output


def test_routing_is_restored_on_exception(full) -> None:
    from flexmoe.model.router import current_mask

    with pytest.raises(RuntimeError), routing(full, mask=expert_mask(full, include=["code"])):
        assert current_mask(full).sum() == 2
        with routing(full, mask=expert_mask(full, exclude=["code"]), record=True):
            assert current_mask(full).sum() == 1  # nested: AND-ed, never re-enabled
            raise RuntimeError("request failed")
    assert current_mask(full).all()


def test_two_threads_with_different_masks_match_each_alone(full) -> None:
    """Per-request routing is thread-local: concurrent requests with different masks give what
    each gives alone."""
    import threading

    x = ids(4, batch=2, length=24)
    masks = [expert_mask(full, include=["code"]), expert_mask(full, exclude=["code", "law"])]
    alone = []
    for m in masks:
        with routing(full, mask=m):
            alone.append(logits(full, x))
    results: dict[int, list] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        for _ in range(15):
            with routing(full, mask=masks[i]):
                results[i].append(logits(full, x))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(results[i]) == 15 and all(torch.equal(r, alone[i]) for r in results[i])
    assert not torch.equal(alone[0], alone[1])


def test_a_model_merged_without_public_has_no_stand_in_public(env) -> None:
    model = load_merged(env["full"])
    experts_of(model).names = [
        "code",
        "math",
        "news",
        "law",
        "extra",
    ]  # as if merged without public
    mask = expert_mask(model, include=["math"])
    assert mask.tolist() == [False, True, False, False, False]
