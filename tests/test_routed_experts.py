"""The routed-experts wire format (issue 24, item 4): per token and MoE layer, the top-k expert
ids the model computed with, in vLLM's `routed_experts` / `prompt_routed_experts` layout, from
`generate`, `flexmoe generate --routed-experts` and `flexmoe serve` (`return_routed_experts`).

The merged model here has the public expert plus a, b, c and top-k 3, so a request allowed only
public + one expert has fewer allowed experts than k: its empty slots must read -1, never the
duplicate the router pads with at weight 0. Ids are checked against a direct forward pass over
the same tokens, recomputed from the routers' own logits (mask and bias applied here, not by the
code under test).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import random_merged, run_cli
from flexmoe.inference.generate import generate
from flexmoe.model.router import (
    NO_EXPERT,
    RoutingTrace,
    capture_router_logits,
    routers,
    routing,
)
from flexmoe.selection import expert_mask, expert_names
from flexmoe.serving import Server
from flexmoe.serving.engine import Job, decode
from test_serve import KEYS, NAMES, Running, raw

TOP_K = 3
EXPERTS = ["public", *NAMES]  # the merged model's order: ids 0..3
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def env(work, anchor_dir) -> dict:
    """A merged model (public + a, b, c, top-k 3, a chat template) served without keys."""
    from flexmoe.data.tokenizer import load_tokenizer

    root = work / "routed"
    root.mkdir()
    random_merged(root, anchor_dir, NAMES, 80, top_k=TOP_K)
    tok = load_tokenizer(root / "merged")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "merged")
    server = Server(root / "merged", state_dir=root / "state")
    with Running(server) as running:
        yield {"root": root, "server": server, "url": running.url}


def client(env):
    from openai import OpenAI

    return OpenAI(base_url=env["url"] + "/v1", api_key=KEYS["alpha"], max_retries=0)


def direct_ids(model, tokens: list[int], mask: torch.Tensor) -> torch.Tensor:
    """(tokens, layers, TOP_K) ids from ONE forward over `tokens`, recomputed from the routers'
    biased logits: mask to −∞, softmax, top-k, and -1 for a slot no allowed expert fills."""
    with torch.no_grad(), capture_router_logits(model) as logits, routing(model, mask=mask):
        model(torch.tensor([tokens]))
    out = []
    for (layer,) in logits:  # (tokens, experts): one forward per layer
        probs = torch.softmax(layer.masked_fill(~mask, float("-inf")), -1)
        value, index = probs.topk(TOP_K, -1)
        out.append(torch.where(value > 0, index, NO_EXPERT))
    return torch.stack(out, 1)


def used(rows: list) -> set[int]:
    return {i for row in rows for layer in row for i in layer} - {NO_EXPERT}


def alone(env, prompt: str, n: int, **kw):
    s = env["server"]
    return generate(s.model, s.tok, prompt, n, routed_experts=True, attribution=True, **kw)


# ---------------------------------------------------------------- generate


@pytest.mark.parametrize(
    "exclude", [None, ["b"], ["a", "c"], ["a", "b", "c"]], ids=["all", "-b", "-a-c", "public"]
)
def test_generate_shapes_range_and_direct_forward(env, exclude):
    """Shapes [len(prompt)|len(generated), layers, k]; ids in range; excluded ids absent; every
    row equals a direct forward pass over prompt + generated tokens (greedy); the last generated
    token, never fed to the model, is all -1; a row with fewer allowed experts than k is padded
    with -1 after its allowed experts."""
    model = env["server"].model
    g = alone(env, "The cat sat on", 7, exclude=exclude)
    layers = len(routers(model))
    assert layers == model.config.num_hidden_layers
    p, n = len(g.prompt_ids), len(g.token_ids)
    assert torch.tensor(g.prompt_routed_experts).shape == (p, layers, TOP_K)
    assert torch.tensor(g.routed_experts).shape == (n, layers, TOP_K)
    assert g.expert_names == EXPERTS == expert_names(model)
    allowed = {EXPERTS.index(x) for x in g.active}
    every = used(g.prompt_routed_experts) | used(g.routed_experts)
    assert every <= allowed and all(0 <= i < len(EXPERTS) for i in every)
    assert not every & {EXPERTS.index(x) for x in exclude or []}
    mask = expert_mask(model, exclude=exclude)
    want = direct_ids(model, g.prompt_ids + g.token_ids, mask)
    assert g.prompt_routed_experts == want[:p].tolist()
    assert g.routed_experts[:-1] == want[p : p + n - 1].tolist()
    assert g.routed_experts[-1] == [[NO_EXPERT] * TOP_K] * layers
    filled = min(TOP_K, len(allowed))  # slots with an expert, the rest -1, in every real row
    for row in g.prompt_routed_experts + g.routed_experts[:-1]:
        for slots in row:
            assert all(i >= 0 for i in slots[:filled]) and slots[filled:] == [-1] * (TOP_K - filled)
            assert len(set(slots[:filled])) == filled  # never the router's weight-0 duplicate


def test_names_map_ids(env):
    """With public + c only, every computed row holds exactly ids {public, c} (and -1)."""
    g = alone(env, "Court rules", 5, include=["c"])
    assert g.active == ["public", "c"]
    want = {EXPERTS.index("public"), EXPERTS.index("c")}
    for row in g.prompt_routed_experts + g.routed_experts[:-1]:
        for slots in row:
            assert set(slots) == want | {NO_EXPERT} and slots[-1] == NO_EXPERT


def test_attribution_is_the_same_record(env):
    """The shares come from the routed record: an expert has a share exactly when its id is in
    the rows that made the generated tokens (the last prompt row and every generated row but the
    last); and the new sum equals RoutingTrace's own over a direct forward."""
    g = alone(env, "def f(x):", 6, exclude=["a"])
    rows = g.prompt_routed_experts[-1:] + g.routed_experts[:-1]
    shared = {EXPERTS.index(n) for n, s in g.attribution.items() if s > 0}
    assert shared == used(rows) and abs(sum(g.attribution.values()) - 1) < 1e-9
    model = env["server"].model
    with torch.no_grad(), routing(model, expert_mask(model, exclude=["a"]), record=True) as rec:
        model(torch.tensor([g.prompt_ids + g.token_ids]))
    trace = RoutingTrace(rec, len(EXPERTS))
    routes = trace.routes(TOP_K)
    assert torch.allclose(routes.shares(), trace.shares(), atol=1e-12, rtol=0)
    assert torch.allclose(routes.layer_weights(), trace.layer_weights(), atol=1e-12, rtol=0)


def test_batched_rows_keep_their_own_experts(env):
    """The engine's batch, deterministically (decode called with three rows at once): each row
    gets its own prompt and token ids, equal to the request alone, never another row's experts;
    a public-only row is padded with -1 though the batch's top-k is 3."""
    s = env["server"]
    cases = [("The cat sat on", None), ("def f(x):", ["a", "b", "c"]), ("3 +", ["a", "b"])]
    loop = asyncio.new_event_loop()
    try:
        jobs = [
            Job(
                s.tok(p, add_special_tokens=False)["input_ids"],
                expert_mask(s.model, exclude=ex),
                6,
                0.0,
                1.0,
                None,
                [],
                loop,
                asyncio.Queue(),
            )
            for p, ex in cases
        ]
        decode(s.model, s.tok, jobs)
    finally:
        loop.close()
    for job, (prompt, ex) in zip(jobs, cases, strict=True):
        ref = alone(env, prompt, 6, exclude=ex)
        prompt_rows, rows = job.routed_experts()
        assert prompt_rows == ref.prompt_routed_experts
        assert rows == ref.routed_experts[: len(job.tokens)]
        assert not used(prompt_rows + rows) & {EXPERTS.index(x) for x in ex or []}
    public_only = jobs[1].routed_experts()[0]
    assert all(slots == [0, -1, -1] for row in public_only for slots in row)


def test_a_revoked_row_reports_nothing_it_did_not_choose(env):
    """A row whose only expert is revoked before the prefill is still run by the batch (with
    the experts left), but it chose none of them: its prompt rows are all -1, no tokens."""
    from flexmoe.model.router import set_active_experts

    s = env["server"]
    loop = asyncio.new_event_loop()
    ids = s.tok("The cat", add_special_tokens=False)["input_ids"]
    only_c = expert_mask(s.model, include=["c"], exclude=["public"], allow_no_public=True)
    jobs = [Job(ids, m, 3, 0.0, 1.0, None, [], loop, asyncio.Queue()) for m in (only_c, None)]
    jobs[1].mask = expert_mask(s.model)
    try:
        set_active_experts(s.model, [n != "c" for n in EXPERTS])
        decode(s.model, s.tok, jobs)
    finally:
        set_active_experts(s.model, [True] * len(EXPERTS))
        loop.close()
    prompt_rows, rows = jobs[0].routed_experts()
    assert jobs[0].tokens == [] and rows == [] and used(prompt_rows) == set()
    assert len(prompt_rows) == len(ids)
    assert EXPERTS.index("c") not in used(sum(jobs[1].routed_experts(), []))


def test_cli_prints_the_record(env, capsys):
    code, out, err = run_cli(
        [
            "generate",
            "--model",
            env["root"] / "merged",
            "--prompt",
            "The cat",
            "--max-new-tokens",
            "4",
            "--exclude",
            "b",
            "--attribution",
            "--routed-experts",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert "attribution over" in out  # next to the attribution table
    assert record["expert_names"] == EXPERTS
    ref = alone(env, "The cat", 4, exclude=["b"])
    assert record["routed_experts"] == ref.routed_experts
    assert record["prompt_routed_experts"] == ref.prompt_routed_experts
    assert record["token_ids"] == ref.token_ids and record["prompt_token_ids"] == ref.prompt_ids
    assert EXPERTS.index("b") not in used(record["routed_experts"])


def test_cli_refuses_a_dense_model(anchor_dir, capsys):
    code, _, err = run_cli(
        ["generate", "--model", anchor_dir, "--prompt", "x", "--routed-experts"], capsys
    )
    assert code == 2 and "--routed-experts" in err and "dense" in err


# ---------------------------------------------------------------- serve


def test_serve_completions(env):
    r = client(env).completions.create(
        model="merged",
        prompt="The cat sat on",
        max_tokens=6,
        temperature=0,
        extra_body={"experts": {"exclude": ["b"]}, "return_routed_experts": True},
    )
    ref = alone(env, "The cat sat on", 6, exclude=["b"])
    choice = r.choices[0].model_extra
    n = r.usage.completion_tokens
    assert r.choices[0].text == ref.text
    assert choice["routed_experts"] == ref.routed_experts[:n]
    assert choice["prompt_routed_experts"] == ref.prompt_routed_experts
    assert r.model_extra["prompt_routed_experts"] == ref.prompt_routed_experts  # vLLM's place
    assert r.model_extra["expert_names"] == EXPERTS
    layers = len(routers(env["server"].model))
    assert torch.tensor(choice["routed_experts"]).shape == (n, layers, TOP_K)
    assert torch.tensor(choice["prompt_routed_experts"]).shape == (
        r.usage.prompt_tokens,
        layers,
        TOP_K,
    )
    assert EXPERTS.index("b") not in used(
        choice["routed_experts"] + choice["prompt_routed_experts"]
    )
    plain = client(env).completions.create(model="merged", prompt="x", max_tokens=2)
    assert "routed_experts" not in plain.choices[0].model_extra
    assert "expert_names" not in plain.model_extra  # only when asked


def test_serve_chat(env):
    r = client(env).chat.completions.create(
        model="merged",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        extra_body={"experts": {"include": ["a"]}, "return_routed_experts": True},
    )
    ref = alone(env, "user: hi\nassistant:", 5, include=["a"])
    choice = r.choices[0].model_extra
    assert r.choices[0].message.content == ref.text
    assert choice["routed_experts"] == ref.routed_experts[: r.usage.completion_tokens]
    assert choice["prompt_routed_experts"] == ref.prompt_routed_experts
    assert r.model_extra["expert_names"] == EXPERTS
    assert used(choice["routed_experts"]) <= {EXPERTS.index("public"), EXPERTS.index("a")}


def test_concurrent_requests_never_see_each_others_experts(env):
    """Concurrent clients with different exclusions (batched by the engine): each answer's ids
    avoid its own excluded experts and equal the same request served alone."""
    exclusions = [None, ["a"], ["b", "c"], ["a", "b", "c"], ["c"], ["a", "b"]]
    prompts = ["The cat", "def f(x):", "Court rules that", "3 + 4 =", "The sky of", "Hello"]
    reqs = [(prompts[i % 6], exclusions[i % 6], 3 + i % 4) for i in range(18)]
    before = env["server"].engine.batches

    def one(req):
        prompt, ex, n = req
        body = {"return_routed_experts": True} | ({"experts": {"exclude": ex}} if ex else {})
        r = client(env).completions.create(
            model="merged", prompt=prompt, max_tokens=n, temperature=0, extra_body=body
        )
        return r.choices[0].model_extra, r.usage.completion_tokens

    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(one, reqs))
    assert env["server"].engine.batches - before < len(reqs)  # requests shared batches
    for (prompt, ex, n), (choice, made) in zip(reqs, got, strict=True):
        ids = used(choice["routed_experts"] + choice["prompt_routed_experts"])
        assert not ids & {EXPERTS.index(x) for x in ex or []}, (prompt, ex, ids)
        ref = alone(env, prompt, n, exclude=ex)
        assert choice["routed_experts"] == ref.routed_experts[:made], (prompt, ex)
        assert choice["prompt_routed_experts"] == ref.prompt_routed_experts, (prompt, ex)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "extra, code",
    [
        ({"return_routed_experts": "true"}, "invalid_type"),
        ({"return_routed_experts": 1}, "invalid_type"),
        ({"return_routed_experts": [True]}, "invalid_type"),
        ({"return_routed_experts": True, "stream": True}, "unsupported_parameter"),
    ],
    ids=["string", "int", "list", "stream"],
)
def test_serve_refuses(env, path, extra, code):
    chat = {"messages": [{"role": "user", "content": "x"}]}
    body = {"prompt": "x"} if path == "/v1/completions" else chat
    r = raw(env, path, body | extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "return_routed_experts" and err["code"] == code, err


def test_serve_refuses_through_the_client(env):
    import openai

    with pytest.raises(openai.BadRequestError, match="not supported with stream"):
        client(env).completions.create(
            model="merged",
            prompt="x",
            max_tokens=2,
            stream=True,
            extra_body={"return_routed_experts": True},
        )


def test_serve_refuses_a_dense_model(env, anchor_dir):
    server = Server(anchor_dir, state_dir=env["root"] / "state-dense")
    with Running(server) as running:
        body = {"prompt": "x", "max_tokens": 2, "return_routed_experts": True}
        r = raw({"url": running.url}, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "return_routed_experts"
        ok = raw({"url": running.url}, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
