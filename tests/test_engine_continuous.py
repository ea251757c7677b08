"""The engine's continuous batching, driven directly with `Job`s on the real tiny model: a request
joins the running decode at the next step and leaves when it ends, and every row stays exactly
what the same request gives alone (`generate`): text, routed experts, attribution. Revocations
reach running rows at the next step; a cancelled row frees its place."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from conftest import random_merged
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.inference.generate import generate
from flexmoe.model.router import NO_EXPERT, set_active_experts
from flexmoe.selection import expert_mask, expert_names
from flexmoe.serving.engine import Engine, Job, Limits
from flexmoe.store.merged import is_merged, load_model
from test_serve_fail_closed import PauseAt

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def loop():
    """An event loop in a thread: the engine sends each job's events to it, as to the server's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def merged(work, anchor_dir):
    root = work / "engine-continuous"
    root.mkdir()
    random_merged(root, anchor_dir, NAMES, 40)
    model = load_model(root / "merged", root / "state").eval()
    return model, load_tokenizer(root / "merged")


class Engines:
    """Started engines, stopped at the end of the test."""

    def __init__(self):
        self.all: list[Engine] = []

    def __call__(self, model, tok, **limits) -> Engine:
        engine = Engine(model, tok, Limits(**limits))
        engine.start()
        self.all.append(engine)
        return engine


@pytest.fixture
def engines():
    made = Engines()
    yield made
    for e in made.all:
        e.stop()
    for e in made.all:
        e.thread.join(10)


class Request:
    """One job, submitted to `engine` if given, and what came back for it: the streamed text,
    the last event and when it came."""

    def __init__(self, loop, model, tok, prompt, n, include=None, mask=None, engine=None, **kw):
        self.prompt, self.n, self.include = prompt, n, include
        if mask is None and is_merged(model):
            mask = expert_mask(model, include)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        self.job = Job(ids, mask, n, 0.0, 1.0, None, [], loop, asyncio.Queue(), **kw)
        self.streamed, self.done, self.finished_at = "", None, None
        self.future = asyncio.run_coroutine_threadsafe(self._collect(), loop)
        if engine is not None:
            assert engine.submit(self.job)

    async def _collect(self) -> None:
        while True:
            kind, payload = await self.job.events.get()
            if kind == "token":
                self.streamed += payload
            else:
                self.done, self.finished_at = (kind, payload), time.monotonic()
                return

    def result(self) -> dict:
        self.future.result(60)
        kind, payload = self.done
        assert kind == "done", payload
        return payload


def wait_for(cond, what: str, limit: float = 30) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, what
        time.sleep(0.002)


def alone(model, tok, r: Request, **kw):
    return generate(model, tok, r.prompt, r.n, include=r.include, **kw)


class GradProbe:
    """The engine's step lock, noting whether autograd was on at each forward."""

    def __init__(self, inner):
        self.inner, self.grad = inner, set()

    def __enter__(self):
        self.grad.add(torch.is_grad_enabled())
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


LONG_PROMPT = "The court ruled that the contract was void because " * 3


def used(rows) -> set[int]:
    return {e for row in rows for layer in row for e in layer} - {NO_EXPERT}


def test_requests_join_and_leave_a_running_decode(merged, loop, engines):
    """Mixed lengths, prompts and expert subsets, arriving while others decode: each text is the
    request's own greedy text alone; a short request that arrives while a long one runs is
    answered first. Newcomers join caches narrower and wider than their own, and the long row
    runs on after the wide row leaves (its padding columns trimmed)."""
    model, tok = merged
    e = engines(model, tok, max_batch=8)
    probe = e.step_lock = GradProbe(e.step_lock)
    first = Request(loop, model, tok, "The cat", 64, ["a"], engine=e)
    wait_for(lambda: len(first.job.tokens) >= 3, "the first request did not start")
    before = e.batches
    short = Request(loop, model, tok, "def f(x):", 2, ["b", "c"], engine=e)
    wide = Request(loop, model, tok, LONG_PROMPT, 12, None, engine=e)  # wider than the cache
    wait_for(lambda: short.done is not None, "the short request did not finish")
    later = [
        Request(loop, model, tok, "3 + 4 =", 2, ["c"], engine=e),
        Request(loop, model, tok, "Breaking news:", 12, ["a", "b"], engine=e),
    ]
    reqs = [first, short, wide, *later]
    for r in reqs:
        assert r.result()["finish_reason"] in ("length", "stop")
    assert short.finished_at < first.finished_at and wide.finished_at < first.finished_at
    assert e.batches - before >= 2  # newcomers were admitted while rows were running
    assert probe.grad == {False}  # no autograd graph kept across steps
    for r in reqs:
        ref = alone(model, tok, r)
        assert r.done[1]["text"] == r.streamed == ref.text, (r.prompt, r.include)
        assert r.job.tokens == [t for t in ref.token_ids if t != tok.eos_token_id]


def test_routes_and_attribution_joined_equal_alone(merged, loop, engines):
    """A request joined mid-decode reports the same routed experts (vLLM's layout) and the same
    attribution as the request served alone, never another row's experts."""
    model, tok = merged
    names = expert_names(model)
    e = engines(model, tok)
    solo = Request(loop, model, tok, "Court rules", 8, ["b"], engine=e)
    solo.result()
    runner = Request(loop, model, tok, LONG_PROMPT, 64, ["a", "c"], engine=e)
    wait_for(lambda: len(runner.job.tokens) >= 4, "the running request did not start")
    joined = Request(loop, model, tok, "Court rules", 8, ["b"], engine=e)
    joined.result()
    runner.result()
    assert joined.finished_at < runner.finished_at and e.batches == 3
    ref = alone(model, tok, joined, routed_experts=True, attribution=True)
    for r in (solo, joined):
        prompt_rows, rows = r.job.routed_experts()
        assert prompt_rows == ref.prompt_routed_experts
        assert rows == ref.routed_experts[: len(r.job.tokens)]
        share = (r.job.weights / r.job.weights.sum()).tolist()
        assert share == pytest.approx([ref.attribution[n] for n in names], abs=1e-6)
        assert used(prompt_rows + rows) <= {names.index("public"), names.index("b")}


def test_revocation_reaches_running_rows_at_the_next_step(merged, loop, engines):
    """Revoked before the 4th forward (prefill + 2 steps: 3 tokens made): from that forward on
    no row computes with the experts; a row with no expert left ends "revoked" with what it
    made, the other runs on with the public expert."""
    model, tok = merged
    names = expert_names(model)
    only_c = expert_mask(model, include=["c"], exclude=["public"], allow_no_public=True)
    e = Engine(model, tok, Limits(batch_window_s=0.2))
    gate = e.step_lock = PauseAt(e.step_lock, 4)
    kept = Request(loop, model, tok, "The cat", 10, ["a", "c"], engine=e)
    gone = Request(loop, model, tok, "def f(x):", 10, mask=only_c, engine=e)
    e.start()  # both queued before: one admission, forwards counted from the prefill
    engines.all.append(e)
    try:
        assert gate.paused.wait(30)
        with gate.inner:  # what Server.revoke does
            set_active_experts(model, [n not in ("a", "c") for n in names])
        gate.resume.set()
        assert kept.result()["finish_reason"] in ("length", "stop")
        assert gone.result()["finish_reason"] == "revoked"
    finally:
        with gate.inner:
            set_active_experts(model, [True] * len(names))
    a, c, public = (names.index(n) for n in ("a", "c", "public"))
    rows = kept.job.routed_experts()[1]
    assert len(kept.job.tokens) > 3 and {a, c} <= used(rows[:2])
    assert used(rows[2:]) == {public} and set(kept.job.top_expert[3:]) == {public}
    assert len(gone.job.tokens) == 3
    rows = gone.job.routed_experts()[1]
    assert used(rows[:2]) == {c} and used(rows[2:]) == set()  # run, never chosen


def test_cancelled_or_expired_rows_free_their_place(merged, loop, engines):
    """max_batch 1: the next request can only run once the running row has left."""
    model, tok = merged
    e = engines(model, tok, max_batch=1)
    hog = Request(loop, model, tok, "The cat", 500, ["a"], engine=e)
    wait_for(lambda: len(hog.job.tokens) >= 2, "the first request did not start")
    nxt = Request(loop, model, tok, "3 + 4 =", 3, ["b"], engine=e)
    time.sleep(0.05)
    assert nxt.done is None and not nxt.job.tokens  # no room for it yet
    hog.job.cancelled = True
    assert nxt.result()["text"] == alone(model, tok, nxt).text
    assert hog.done is not None and len(hog.job.tokens) < 500
    late = Request(loop, model, tok, "The sky", 500, deadline=time.monotonic() + 0.3, engine=e)
    assert late.result()["finish_reason"] == "timeout"
    assert e.abandoned == 2


def test_static_batching_is_still_there(merged, loop, engines):
    model, tok = merged
    e = engines(model, tok, batching="static", batch_window_s=0.2)
    reqs = [
        Request(loop, model, tok, "The cat", 6, ["a"], engine=e),
        Request(loop, model, tok, LONG_PROMPT, 2, ["b", "c"], engine=e),
    ]
    for r in reqs:
        assert r.result()["text"] == alone(model, tok, r).text
    assert e.batches == 1 and e.steps == 0
    with pytest.raises(ValueError, match="batching"):
        Limits(batching="dynamic")


def test_dense_model(anchor_dir, loop, engines):
    """A dense model (no masks, no routes) joins and leaves the same way."""
    model, tok = load_model(anchor_dir).eval(), load_tokenizer(anchor_dir)
    e = engines(model, tok)
    first = Request(loop, model, tok, "The cat", 24, engine=e)
    wait_for(lambda: len(first.job.tokens) >= 2, "the first request did not start")
    second = Request(loop, model, tok, LONG_PROMPT, 4, engine=e)
    for r in (first, second):
        assert r.result()["text"] == alone(model, tok, r).text
    assert second.finished_at < first.finished_at and e.batches == 2
