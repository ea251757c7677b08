"""Selective experts: a bias that can learn, public negatives that teach the owner's gate to
decline public text, router z-loss, and the inference variants the report compares."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from flexmoe.data.shards import TokenStream, shards_sha256
from flexmoe.lifecycle.expert import (
    OWNER,
    PublicNegatives,
    build_two_expert,
    freeze_for_expert,
    make_recipe,
    project_bias,
    train_expert,
)
from flexmoe.model.freezing import merge_owner_params, parametrize_bias
from flexmoe.model.router import capture_router_logits, routers
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.merged import experts_of
from flexmoe.store.package import read_manifest
from flexmoe.train.loop import TrainConfig, train


def _two_expert(anchor_dir, softplus: bool = True, init: float = -1.0):
    anchor, _, extras = load_anchor(anchor_dir)
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    model = build_two_expert(anchor, extras, torch.randn(L, H) * 0.1, "domain")
    if softplus:
        parametrize_bias(model, [OWNER], init)
    return anchor, model


def test_softplus_bias_is_negative_with_a_live_gradient(anchor_dir):
    _, model = _two_expert(anchor_dir, init=-0.5)
    for r in routers(model):
        assert r.bias[0] == 0 and float(r.bias[1].detach()) == pytest.approx(-0.5, abs=1e-6)
    # push b far up: min(b, 0) would give gradient 0 from here on; −softplus(β) never does
    for r in routers(model):
        r.parametrizations.bias.original.data.fill_(-30.0)  # b ≈ −1e-13, as close to 0 as it gets
    with capture_router_logits(model) as captured:
        model(torch.randint(0, 512, (2, 16)))
    loss = sum(c[0][:, 1].sum() for c in captured)  # push the owner's logit
    loss.backward()
    for r in routers(model):
        g = r.parametrizations.bias.original.grad
        assert g[1] != 0 and g[0] == 0
        assert r.bias[1] < 0


def test_paper_bias_gradient_dies_at_zero(anchor_dir):
    """The defect the softplus bias fixes: min(b, 0) has no gradient once an update pushed b
    above 0 (and the projection then parks it at exactly 0 every step)."""
    _, model = _two_expert(anchor_dir, softplus=False)
    for r in routers(model):
        r.bias.data[1] = 1e-3
    with capture_router_logits(model) as captured:
        model(torch.randint(0, 512, (2, 16)))
    sum(c[0][:, 1].sum() for c in captured).backward()
    assert all(r.bias.grad[1] == 0 for r in routers(model))


def test_public_negatives_train_only_the_owners_gate(anchor_dir, shards):
    anchor, model = _two_expert(anchor_dir)
    freeze_for_expert(model)
    neg = PublicNegatives(TokenStream(shards["public/train"]), 4, 32, seed=0, gate_weight=1.0)
    metrics = neg(model, 0, torch.autocast("cpu", enabled=False))
    assert 0 < metrics["public/owner_gate"] < 1 and metrics["public/gate_ce"] > 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            assert p.grad is None, name  # no FFN gradient from public text
        elif "gate.parametrizations.weight" in name:  # the owner's router rows alone
            assert p.shape[0] == 1 and p.grad.abs().sum() > 0
        elif "parametrizations.bias" in name:
            assert p.grad[OWNER] != 0
        else:
            assert p.grad is None, name


def _owner_gate(model, stream) -> float:
    ids = torch.from_numpy(stream.window(0, 4 * 64).reshape(4, 64).copy())
    with torch.no_grad(), capture_router_logits(model) as captured:
        model(ids)
    return float(torch.stack([torch.cat(c).softmax(-1)[:, OWNER].mean() for c in captured]).mean())


def test_public_negatives_make_the_gate_decline_public_text(work, anchor_dir, shards):
    """Same owner data, same steps: with public negatives the owner's expert takes less public
    text, and every frozen tensor (and public slice) stays bit-identical."""
    public = TokenStream(shards["public/heldout"])
    gates = {}
    for recipe in ("paper", "flexmoe"):
        rec = make_recipe(recipe, router_z_loss=1e-3 if recipe == "flexmoe" else None)
        torch.manual_seed(0)
        anchor, model = _two_expert(anchor_dir, softplus=rec.bias == "softplus", init=-1.0)
        ref = {k: v.clone() for k, v in anchor.state_dict().items()}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        masks = freeze_for_expert(model)
        neg = (
            PublicNegatives(TokenStream(shards["public/train"]), 4, 64, 0, rec.gate_weight)
            if rec.public_ratio
            else None
        )
        cfg = TrainConfig(
            steps=12, batch_size=8, seq_len=64, lr=1e-2, router_z_loss=rec.router_z_loss
        )
        res = train(
            model,
            TokenStream(shards["code/train"]),
            cfg,
            work / f"neg-{recipe}",
            grad_masks=masks,
            post_step=project_bias,
            pre_step=neg,
        )
        merge_owner_params(model)
        gates[recipe] = _owner_gate(model, public)
        after = model.state_dict()
        for k, v in after.items():
            if ".mlp.experts." in k or ".mlp.gate." in k:
                assert torch.equal(v[0], before[k][0]), f"public slice of {k} changed"
            else:
                assert torch.equal(v, before[k]) and (k not in ref or torch.equal(v, ref[k])), k
        if recipe == "flexmoe":
            assert "public/owner_gate" in res and res["router_z"] > 0
    assert gates["flexmoe"] < gates["paper"] - 0.05, gates


def test_flexmoe_expert_records_recipe_and_resumes_exactly(work, anchor_dir, shards):
    kw = dict(
        public=shards["public/train"],
        steps=8,
        batch_size=4,
        seq_len=32,
        warmup=1,
        router_docs=4,
        seed=3,
    )
    full = train_expert(anchor_dir, shards["code/train"], work / "sel-full", "code", **kw)
    part = train_expert(
        anchor_dir,
        shards["code/train"],
        work / "sel-part",
        "code",
        ckpt_every=3,
        stop_after=5,
        **kw,
    )
    assert part.get("stopped")
    resumed = train_expert(
        anchor_dir, shards["code/train"], work / "sel-part", "code", ckpt_every=3, resume=True, **kw
    )
    assert resumed["tensors"] == full["tensors"]  # same sha256 for every tensor
    m = read_manifest(work / "sel-full")
    t = m.training.model_dump()
    assert t["recipe"]["name"] == "flexmoe" and t["recipe"]["public_ratio"] > 0
    assert "gate_objective" in t["recipe"]
    assert t["public_data_sha256"] == shards_sha256(shards["public/train"])  # "tokens-v1:…"


def test_flexmoe_recipe_without_public_data_is_one_line_error(work, anchor_dir, shards, capsys):
    args = ["expert", "train", "--anchor", anchor_dir, "--data", shards["code/train"]]
    args += ["--name", "code", "-o", work / "nopublic", "--steps", 2]
    code, out, err = run_cli(args, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--public" in lines[0], err
    assert not (work / "nopublic").exists()


def test_inference_variants_restore_the_model(work, anchor_dir):
    from conftest import random_package
    from flexmoe.evaluation.demo_eval import inference_variant
    from flexmoe.lifecycle.merge import merge
    from flexmoe.store.merged import load_merged

    pkgs = [random_package(work / f"iv-{n}", anchor_dir, n, i) for i, n in enumerate("ab")]
    merge(anchor_dir, pkgs, work / "iv-merged", top_k=2, log=None)  # renorm needs k < E
    model = load_merged(work / "iv-merged")
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        base = model(ids).logits
        for v in inference_variant.VARIANTS:
            with inference_variant(model, v):
                assert not torch.equal(model(ids).logits, base), v
            assert torch.equal(model(ids).logits, base), v


def test_preselection_keeps_the_closest_experts_and_stays_exact(work, anchor_dir):
    """Request-level preselection: public + the expert whose domain embedding is closest to the
    prompt; the result is exactly the model with only those experts included."""
    from conftest import random_package, sample_texts
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.inference.generate import generate
    from flexmoe.inference.preselect import preselect_mask
    from flexmoe.lifecycle.merge import merge
    from flexmoe.lifecycle.router_init import embed_documents
    from flexmoe.store.merged import load_merged

    pkgs = [
        random_package(
            work / f"ps-{d}",
            anchor_dir,
            d,
            i,
            embedding=embed_documents(sample_texts(d, "train", 8)),
        )
        for i, d in enumerate(["code", "news", "social"])
    ]
    merge(anchor_dir, pkgs, work / "ps-merged", log=None)
    model = load_merged(work / "ps-merged")
    assert sorted(experts_of(model).domain_embeddings) == ["code", "news", "social"]
    code = "import os\ndef main(argv):\n    for path in argv:\n        print(os.stat(path))\n"
    news = "Mr. Speaker, Members of the Congress, my fellow Americans: the state of our Union"
    mask = preselect_mask(model, [code, news, ""], 1)
    names = experts_of(model).names
    assert [n for n, k in zip(names, mask[0], strict=True) if k] == ["public", "code"]
    assert [n for n, k in zip(names, mask[1], strict=True) if k] == ["public", "news"]
    assert mask[2].all()
    tok = load_tokenizer(work / "ps-merged")
    a = generate(model, tok, code, max_new_tokens=6, preselect=1, attribution=True)
    b = generate(model, tok, code, max_new_tokens=6, include=["code"], attribution=True)
    assert a.active == ["public", "code"] and a.token_ids == b.token_ids
    assert a.attribution == b.attribution and a.attribution["news"] == 0


def test_gate_calibration_separates_owner_from_public_and_touches_only_the_gate(anchor_dir, shards):
    from flexmoe.lifecycle.expert import calibrate_gate

    _, model = _two_expert(anchor_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    owner, public = TokenStream(shards["code/train"]), TokenStream(shards["public/train"])
    rec = make_recipe("flexmoe", calibrate=True, calibrate_windows=8)
    res = calibrate_gate(model, owner, public, rec, seq_len=64, seed=0)
    for r in res["layers"]:  # on the calibration windows (the tiny anchor barely generalises)
        assert r["objective_after"] < r["objective_before"]
        assert r["owner_gate_on_owner"] > r["owner_gate_on_public"] + 0.2, r
    for k, v in model.state_dict().items():
        if ".mlp.gate." in k:
            assert torch.equal(v[0], before[k][0]), k  # the public row is untouched
        else:
            assert torch.equal(v, before[k]), k  # FFNs, attention, embeddings untouched
    assert all(float(r.bias[OWNER].detach()) < 0 for r in routers(model))


def test_calibration_can_keep_the_owners_routing_and_decline_public_text(anchor_dir, shards):
    """owner_target "trained" (for pre-norm anchors): the owner's tokens keep the mixing weight
    the owner's FFN was trained under while public text moves to the public expert; the default
    target moves the owner's tokens toward the owner's expert."""
    import copy

    import numpy as np

    from flexmoe.lifecycle.expert import calibrate_gate
    from flexmoe.lifecycle.gate import _router_inputs

    torch.manual_seed(0)
    _, base = _two_expert(anchor_dir)
    owner, public = TokenStream(shards["code/train"]), TokenStream(shards["public/train"])

    def gate(model, stream) -> np.ndarray:  # per layer, mean p_owner on 8 fresh windows
        rng = np.random.default_rng(7)
        starts = rng.integers(0, len(stream) - 65, size=8)
        ids = torch.from_numpy(np.stack([stream.window(int(s), 64) for s in starts]))
        xs = _router_inputs(model, ids)
        with torch.no_grad():
            return np.array(
                [
                    float((x @ r.weight.T.float() + r.bias.float()).softmax(-1)[:, OWNER].mean())
                    for r, x in zip(routers(model), xs, strict=True)
                ]
            )

    own0, pub0 = gate(base, owner), gate(base, public)
    after = {}
    for target in ("owner", "trained"):
        model = copy.deepcopy(base)
        rec = make_recipe(
            "flexmoe", calibrate=True, calibrate_windows=8, calibrate_owner_target=target
        )
        res = calibrate_gate(model, owner, public, rec, seq_len=64, seed=0)
        assert res["owner_target"] == target
        after[target] = gate(model, owner), gate(model, public)
    kept_own, kept_pub = after["trained"]
    pushed_own, _ = after["owner"]
    assert (pushed_own > own0 + 0.1).all()  # the default target moves the owner's text
    # "trained" keeps it far closer (a random router separates the two texts poorly, so
    # declining public text costs the owner's some weight) and still declines public text
    assert np.abs(kept_own - own0).mean() < 0.5 * np.abs(pushed_own - own0).mean()
    assert (kept_pub < pub0 - 0.05).all()


def test_preselection_keeps_opt_out_exact(work, anchor_dir, shards, capsys):
    """Excluding an expert under preselection is the model merged without it: preselection
    chooses among the experts that are still allowed."""
    from conftest import random_package, sample_texts
    from flexmoe.evaluation.heldout import bpb_table
    from flexmoe.lifecycle.merge import merge
    from flexmoe.lifecycle.router_init import embed_documents

    pkgs = {
        d: random_package(
            work / f"px-{d}",
            anchor_dir,
            d,
            i,
            embedding=embed_documents(sample_texts(d, "train", 8)),
        )
        for i, d in enumerate(["code", "math", "news"])
    }
    merge(anchor_dir, list(pkgs.values()), work / "px-all", log=None)
    merge(anchor_dir, [pkgs["math"], pkgs["news"]], work / "px-nocode", log=None)
    root = shards["code/heldout"].parent.parent
    kw = dict(max_tokens=2048, seq_len=64, unigram=False)
    out, notes = bpb_table(work / "px-all", root, exclude=["code"], **kw)
    never, _ = bpb_table(work / "px-nocode", root, **kw)
    assert any("preselection" in n for n in notes)
    for a, b in zip(out, never, strict=True):
        assert a["bpb"] == pytest.approx(b["bpb"], abs=1e-6)
    token, _ = bpb_table(work / "px-all", root, preselect=0, **kw)
    full, _ = bpb_table(work / "px-all", root, **kw)
    assert any(abs(a["bpb"] - b["bpb"]) > 1e-4 for a, b in zip(token, full, strict=True))


def test_hidden_centroids_join_preselection_and_keep_opt_out_exact(work, anchor_dir):
    """Merged with --preselect-hidden: preselection adds the anchor's hidden states (computed by
    the merged model on its public expert alone) to the MiniLM scores; excluding an expert
    still gives exactly the choice of a model merged without it. Without the flag the stored
    centroids are not read."""
    from conftest import random_package, sample_texts
    from flexmoe.errors import FlexmoeError
    from flexmoe.evaluation.heldout import load_for_eval
    from flexmoe.inference.preselect import preselect_mask
    from flexmoe.lifecycle.merge import merge
    from flexmoe.model.hidden import centred_cosine, centroid, mean_hidden
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask
    from flexmoe.store.merged import experts_of, load_merged

    anchor, tok = load_for_eval(anchor_dir)
    doms = ["code", "math", "news"]
    cents = {d: centroid(anchor, tok, sample_texts(d, "train", 8)) for d in doms}
    same = torch.nn.functional.normalize(torch.randn(384), dim=0)  # MiniLM cannot tell them apart
    pkgs = {
        d: random_package(work / f"hc-{d}", anchor_dir, d, i, embedding=same, centroid=cents[d])
        for i, d in enumerate(doms)
    }
    kw = dict(log=None, preselect_hidden=True)
    merge(anchor_dir, list(pkgs.values()), work / "hc-all", **kw)
    merge(anchor_dir, [pkgs["math"], pkgs["news"]], work / "hc-nocode", **kw)
    merge(anchor_dir, list(pkgs.values()), work / "hc-default", log=None)
    full, never = load_merged(work / "hc-all"), load_merged(work / "hc-nocode")
    assert set(experts_of(full).hidden_centroids) == set(doms)
    prompts = [t for d in doms for t in sample_texts(d, "heldout", 3, 300)] + ["def f(n):"]

    public_only = torch.tensor([True, False, False, False])
    with routing(full, mask=public_only):
        h = mean_hidden(full, tok, prompts)
    assert torch.allclose(h, mean_hidden(anchor, tok, prompts), atol=2e-2)  # = the anchor's

    # MiniLM ties, so the pick is the hidden-state ranking, from the stored centroids
    want = centred_cosine(mean_hidden(anchor, tok, prompts), torch.stack(list(cents.values())))
    picks = preselect_mask(full, prompts, 1, tokenizer=tok)[:, 1:].float().argmax(-1)
    assert picks.tolist() == want.argmax(-1).tolist()
    assert len(set(picks.tolist())) > 1  # the texts are told apart

    a = preselect_mask(full, prompts, 1, expert_mask(full, exclude=["code"]), tok)
    b = preselect_mask(never, prompts, 1, tokenizer=tok)
    assert torch.equal(a[:, [0, 2, 3]], b)  # (the caller ANDs the result with the allowed set)
    no_public = torch.tensor([False, True, True, True])  # the anchor's FFN excluded: MiniLM alone
    minilm_only = preselect_mask(full, prompts, 1, no_public)
    assert torch.equal(preselect_mask(full, prompts, 1, no_public, tok), minilm_only)
    default = load_merged(work / "hc-default")  # merged without --preselect-hidden: MiniLM alone
    assert torch.equal(
        preselect_mask(default, prompts, 1, tokenizer=tok), preselect_mask(default, prompts, 1)
    )
    with pytest.raises(FlexmoeError, match="hidden centroid"):
        plain = random_package(work / "hc-plain", anchor_dir, "plain", 9, embedding=same)
        merge(anchor_dir, [pkgs["code"], plain], work / "hc-bad", **kw)


def test_preselection_scores_the_closest_prototype_and_keeps_opt_out_exact(work, anchor_dir):
    """Packages storing MiniLM prototypes are scored by their closest prototype, not their
    mean; when any scored expert stores none, every expert is scored by its mean (one scale);
    excluding an expert gives exactly the choice of a model merged without it."""
    from conftest import random_package
    from flexmoe.errors import FlexmoeError
    from flexmoe.inference.preselect import minilm_scores, preselect_mask
    from flexmoe.lifecycle.merge import merge
    from flexmoe.model.embedding import embed_texts
    from flexmoe.selection import expert_mask
    from flexmoe.store.merged import load_merged

    code = "import os\ndef main(argv):\n    for path in argv:\n        print(os.stat(path))\n"
    news = "Mr. Speaker, Members of the Congress, my fellow Americans: the state of our Union"
    q = torch.from_numpy(embed_texts([code, news])).float()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 7, 384, generator=g)
    # the code owner's mean is unrelated to code; the news owner's mean sits on the code text
    means = {"code": torch.randn(384, generator=g), "news": q[0], "social": -q[0]}
    protos = {
        "code": torch.cat([q[:1], noise[0]]),
        "news": torch.cat([q[1:], noise[1]]),
        "social": torch.cat([-q[:1], noise[2]]),
    }
    pkgs = {
        d: random_package(
            work / f"pt-{d}", anchor_dir, d, i, embedding=means[d], prototypes=protos[d]
        )
        for i, d in enumerate(means)
    }
    merge(anchor_dir, list(pkgs.values()), work / "pt-all", log=None)
    merge(anchor_dir, [pkgs["news"], pkgs["social"]], work / "pt-nocode", log=None)
    full, never = load_merged(work / "pt-all"), load_merged(work / "pt-nocode")
    names = experts_of(full).names
    assert set(experts_of(full).domain_prototypes) == set(means)
    picked = preselect_mask(full, [code, news], 1)
    assert [n for n, k in zip(names, picked[0], strict=True) if k] == ["public", "code"]
    assert [n for n, k in zip(names, picked[1], strict=True) if k] == ["public", "news"]
    by_mean = minilm_scores(full, [code], [1, 2, 3], prototypes=False)
    assert names[1 + int(by_mean.argmax())] == "news"  # what the mean alone would pick
    a = preselect_mask(full, [code, news, "a forum post"], 1, expert_mask(full, exclude=["code"]))
    b = preselect_mask(never, [code, news, "a forum post"], 1)
    assert torch.equal(a[:, [0, 2, 3]], b)

    plain = random_package(work / "pt-plain", anchor_dir, "plain", 7, embedding=q[1])
    merge(anchor_dir, [pkgs["code"], pkgs["news"], plain], work / "pt-mixed", log=None)
    mixed = load_merged(work / "pt-mixed")
    auto = minilm_scores(mixed, [code], [1, 2, 3])
    assert torch.allclose(auto, minilm_scores(mixed, [code], [1, 2, 3], prototypes=False))
    with pytest.raises(FlexmoeError, match="prototypes"):
        minilm_scores(mixed, [code], [1, 2, 3], prototypes=True)


def test_merge_stores_preselection_only_when_every_package_can_be_scored(work, anchor_dir):
    import json

    from conftest import random_package
    from flexmoe.errors import FlexmoeError
    from flexmoe.lifecycle.merge import merge
    from flexmoe.store.merged import MERGED

    plain = random_package(work / "pp-plain", anchor_dir, "plain", 7)
    merge(anchor_dir, [plain], work / "pp-merged", log=None)
    assert json.loads((work / "pp-merged" / MERGED).read_text())["preselect"] is None
    with pytest.raises(FlexmoeError, match="domain embedding"):
        merge(anchor_dir, [plain], work / "pp-merged2", log=None, preselect=1)
    emb = random_package(work / "pp-emb", anchor_dir, "emb", 8, embedding=torch.randn(384))
    merge(anchor_dir, [emb], work / "pp-merged3", log=None)
    assert json.loads((work / "pp-merged3" / MERGED).read_text())["preselect"] == 1


def _lm_recipe(**kw):
    return make_recipe(
        "flexmoe", calibrate=True, calibrate_method="lm", calibrate_steps=12, calibrate_lr=1e-2,
        **kw,
    )  # fmt: skip


def test_lm_calibration_fits_only_the_owners_gate_with_the_lm_loss_and_is_seeded(
    anchor_dir, shards
):
    """Method "lm": the owner's rows (and, on a family that keeps biases, its bias) of every
    layer are fitted together on LM loss + public-gate loss; the fit lowers that objective on
    windows it never trained on, moves nothing else, and a rerun with the same seed is identical."""
    import copy

    from flexmoe.lifecycle.expert import calibrate_gate

    _, base = _two_expert(anchor_dir)
    owner, public = TokenStream(shards["code/train"]), TokenStream(shards["public/train"])
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    res = [calibrate_gate(m, owner, public, _lm_recipe(), seq_len=32, seed=0) for m in models]
    r = res[0]
    assert r["method"] == "lm" and r["router_bias"] is True and len(r["loss"]) == 12

    def objective(t):
        return t["lm_owner"] + t["lm_public"] + r["public_weight"] * t["gate_public"]

    assert objective(r["after"]) < objective(r["before"])
    assert r["after"]["owner_gate_on_public"] < r["before"]["owner_gate_on_public"]
    old, new, again = (m.state_dict() for m in (base, *models))
    moved = False
    for k, v in new.items():
        assert torch.equal(v, again[k]), k  # seeded: the same fit twice
        if ".mlp.gate." in k:
            assert torch.equal(v[0], old[k][0]), k  # the public row / bias never move
            moved |= not torch.equal(v[1], old[k][1])
        else:
            assert torch.equal(v, old[k]), k  # FFNs, attention, embeddings untouched
    assert moved
    assert all(p.grad is None for p in models[0].parameters())
    assert [p.requires_grad for p in models[0].parameters()] == [
        p.requires_grad for p in base.parameters()
    ]


@pytest.mark.parametrize("method", ["lm", "classifier"])
def test_calibration_on_the_mixtral_row_fits_with_the_bias_the_merge_will_use(shards, method):
    """The Mixtral row drops router biases at merge (model.arch), so both calibrations fit with
    b = 0 and leave the stored bias alone; the public row stays bit-identical."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_VOCAB
    from flexmoe.lifecycle.expert import calibrate_gate
    from flexmoe.model.moe import upcycle

    torch.manual_seed(0)
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
    ).eval()  # fmt: skip
    model = upcycle(dense, 2, 2)
    with torch.no_grad():
        for r in routers(model):
            r.weight.normal_(0, 0.1)
            r.bias[OWNER] = -0.7
        for n, p in model.named_parameters():
            if ".mlp.experts." in n:
                p[OWNER].add_(torch.randn_like(p[OWNER]) * 0.02)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    owner, public = TokenStream(shards["code/train"]), TokenStream(shards["public/train"])
    rec = (
        _lm_recipe()
        if method == "lm"
        else make_recipe("flexmoe", calibrate=True, calibrate_windows=4)
    )
    res = calibrate_gate(model, owner, public, rec, seq_len=32, seed=0)
    assert res["method"] == method and res["router_bias"] is False
    assert method != "lm" or "b = 0" in res["objective"]
    assert all(x["bias"] == 0.0 for x in res["layers"])
    for k, v in model.state_dict().items():
        if k.endswith(".mlp.gate.weight"):
            assert torch.equal(v[0], old[k][0]) and not torch.equal(v[1], old[k][1]), k
        else:
            assert torch.equal(v, old[k]), k  # the bias included: not fitted, left as stored
    assert all(r.use_bias for r in routers(model))


def test_expert_calibrate_cli_writes_a_verified_package(work, anchor_dir, shards, capsys):
    from conftest import random_package
    from flexmoe.store.package import verify_package

    pkg = random_package(work / "cal-in", anchor_dir, "code", 3, embedding=torch.randn(384))
    args = ["expert", "calibrate", pkg, "--anchor", anchor_dir, "--data", shards["code/train"]]
    args += ["--public", shards["public/train"], "--windows", 4, "--seq-len", 64]
    code, out, err = run_cli([*args, "-o", work / "cal-out"], capsys)
    assert code == 0, err
    assert "layer 0: owner gate" in out
    anchor, rec, extras = load_anchor(anchor_dir)
    m, tensors = verify_package(work / "cal-out", rec, extras, anchor.config)
    assert m.training.model_dump()["gate_calibration"]["recalibrated"]
    assert "domain_embedding" in tensors
    code, out, err = run_cli([*args, "--method", "nobody", "-o", work / "cal-bad"], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "calibrate_method" in lines[0], err
    assert not (work / "cal-bad").exists()
    code, out, err = run_cli([*args, "--public-weight", -1, "-o", work / "cal-bad"], capsys)
    assert code == 2 and "public-weight" in err and not (work / "cal-bad").exists(), err
    code, out, err = run_cli([*args, "--owner-target", "nobody", "-o", work / "cal-bad"], capsys)
    assert code == 2 and "calibrate_owner_target" in err and not (work / "cal-bad").exists()
    code, out, err = run_cli([*args, "--owner-target", "trained", "-o", work / "cal-kept"], capsys)
    assert code == 0, err
    m, _ = verify_package(work / "cal-kept", rec, extras, anchor.config)
    assert m.training.model_dump()["gate_calibration"]["owner_target"] == "trained"
    lm = [*args, "--method", "lm", "--steps", 3, "--lr", 1e-2, "-o", work / "cal-lm"]
    code, out, err = run_cli(lm, capsys)
    assert code == 0, err
    m, _ = verify_package(work / "cal-lm", rec, extras, anchor.config)
    cal = m.training.model_dump()["gate_calibration"]
    assert cal["method"] == "lm" and cal["steps"] == 3 and cal["recalibrated"]


def test_expert_centroid_adds_what_training_would_have_stored(work, anchor_dir, shards, capsys):
    """An older package (no hidden centroid) gains the centroid `expert train` computes from the
    manifest's documents; the weights are unchanged; compressed packages are refused."""
    from conftest import random_package
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.lifecycle.router_init import document_statistics, sample_documents
    from flexmoe.model.hidden import CENTROID_DOCS, centroid
    from flexmoe.store.package import verify_package

    pkg = random_package(work / "hc-old", anchor_dir, "code", 5, embedding=torch.randn(384))
    args = ["expert", "centroid", pkg, "--anchor", anchor_dir, "--data", shards["code/train"]]
    code, out, err = run_cli([*args, "-o", work / "hc-new"], capsys)
    assert code == 0, err
    anchor, rec, extras = load_anchor(anchor_dir)
    old_m, old = verify_package(pkg, rec, extras, anchor)
    m, new = verify_package(work / "hc-new", rec, extras, anchor)
    assert set(new) - set(old) == {"hidden_centroid", "domain_prototypes"}
    assert all(torch.equal(old[k], new[k]) for k in old)
    tok = load_tokenizer(anchor_dir)
    texts = sample_documents(TokenStream(shards["code/train"]), tok, 1000, 5)
    heads = texts[:CENTROID_DOCS]
    assert torch.allclose(new["hidden_centroid"], centroid(anchor, tok, heads), atol=1e-6)
    assert "added after training" in m.training.model_dump()["hidden_centroid"]
    want = document_statistics(texts, 5)["domain_prototypes"]
    assert torch.allclose(new["domain_prototypes"], want, atol=1e-5)
    code, _, err = run_cli([*args[:2], work / "hc-new", *args[3:], "-o", work / "hc-again"], capsys)
    assert code == 2 and "already stores" in err and not (work / "hc-again").exists()
    small = work / "hc-small"
    code, _, err = run_cli(
        ["expert", "compress", pkg, "--anchor", anchor_dir, "--rank", 2, "-o", small], capsys
    )
    assert code == 0, err
    code, _, err = run_cli([*args[:2], small, *args[3:], "-o", work / "hc-bad"], capsys)
    assert code == 2 and "compressed" in err and len(err.strip().splitlines()) == 1
    assert not (work / "hc-bad").exists()


def test_recipe_auto_follows_the_family():
    """flexmoe's bias: softplus where the merge keeps owners' biases (OLMo-2, Qwen3), b ≡ 0 where
    it drops them (Mixtral row); its calibration: only on post-norm blocks (OLMo-2); explicit
    settings and the paper's recipe are left alone."""
    from flexmoe.errors import FlexmoeError
    from flexmoe.lifecycle.gate import for_family
    from flexmoe.model.arch import family_of

    rec = make_recipe("flexmoe")
    assert (rec.bias, rec.calibrate) == ("auto", "auto")
    olmo, llama, qwen = (for_family(rec, family_of(t)) for t in ("olmo2", "llama", "qwen3"))
    assert (olmo.bias, olmo.bias_init, olmo.calibrate) == ("softplus", rec.bias_init, True)
    assert (llama.bias, llama.bias_init, llama.calibrate) == ("none", 0.0, False)
    assert (qwen.bias, qwen.bias_init, qwen.calibrate) == ("softplus", rec.bias_init, False)
    paper = make_recipe("paper")
    assert for_family(paper, family_of("llama")) == paper
    explicit = make_recipe("flexmoe", bias="clamp", bias_init=0.0, calibrate=True)
    assert for_family(explicit, family_of("llama")) == explicit
    with pytest.raises(FlexmoeError, match="calibrate"):
        make_recipe("flexmoe", calibrate="sometimes")
    with pytest.raises(FlexmoeError, match="bias-init"):
        make_recipe("flexmoe", bias="none", bias_init=-1.0)
