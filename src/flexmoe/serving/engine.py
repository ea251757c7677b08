"""The engine: one thread that decodes the waiting requests together, each with its own experts.

One model instance serves every request. The engine groups the requests waiting in a bounded
queue (full: the caller answers 503) into one batch and decodes them together. Each batch row
has its own expert mask (model.routing rows), its own sampling generator and its own stop rules,
and records the routing weight each expert carried for its generated tokens (the attribution)
and, from the same record, the expert ids each of its own positions was computed with (vLLM's
`routed_experts` layout: see `Job.routed_experts`).
Every forward holds `step_lock`, so a revocation takes effect for every running row at the next
step, never in the middle of one; rows of cancelled or expired requests stop at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from flexmoe.model.router import NO_EXPERT, RoutingTrace, routers, routing


@dataclass
class Limits:
    """The server's bounds: the engine's queue and batch, and each request's size and time."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    queue_size: int = 64
    max_batch: int = 16
    batch_window_s: float = 0.005
    timeout_s: float = 120.0  # the whole request: queueing, prefill and every token

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: a prompt within the limit (≤ 16 characters per token, each at
        most 8 bytes of escaped JSON) plus room for the other fields."""
        return 128 * self.max_prompt_tokens + (64 << 10)


@dataclass
class Job:
    """One request as the engine sees it; events go back to the HTTP handler's loop."""

    ids: list[int]
    mask: torch.Tensor | None  # (E,) bool, None for a dense model
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    deadline: float = float("inf")  # time.monotonic() after which the request is abandoned
    cancelled: bool = False  # the client went away or timed out: its row stops at the next step
    tokens: list[int] = field(default_factory=list)
    top_expert: list[int] = field(default_factory=list)
    weights: torch.Tensor | None = None  # (E,) summed routing weight of generated tokens
    # this row's own positions only: (prompt tokens, layers, top-k) and one (layers, top-k) per
    # generated token that was fed back to the model; NO_EXPERT where no expert was used
    prompt_routes: torch.Tensor | None = None
    routes: list[torch.Tensor] = field(default_factory=list)

    def emit(self, kind: str, payload: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def routed_experts(self) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
        """(prompt_routed_experts, routed_experts) in vLLM's layout, [tokens][layers][top-k]:
        row t is what the row's position t was computed with. A generated token this request
        never fed back (its last one, unless an end-of-text token followed; the engine may still
        have run it for a longer row of the batch) is all NO_EXPERT, so a request gets the same
        rows alone as batched."""
        prompt = self.prompt_routes
        missing = len(self.tokens) - len(self.routes)
        pad = [torch.full(prompt.shape[1:], NO_EXPERT, dtype=prompt.dtype)] * max(missing, 0)
        rows = (self.routes + pad)[: len(self.tokens)]
        generated = torch.stack(rows).tolist() if rows else []
        return prompt.tolist(), generated


class Engine:
    """A thread that takes waiting jobs (up to max_batch, after a short window) and decodes them
    as one batch: left-padded prefill, then one forward per step with the KV cache. Each forward
    holds `step_lock`: a revocation (set_active_experts under the same lock) takes effect for
    every running row at the next step, never in the middle of one."""

    def __init__(self, model, tokenizer, limits: Limits):
        self.model, self.tok, self.limits = model, tokenizer, limits
        self.step_lock = threading.RLock()
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=limits.queue_size)
        self.thread = threading.Thread(target=self._run, name="flexmoe-engine", daemon=True)
        self.stopping = False
        self.batches = 0
        self.abandoned = 0  # rows stopped early: client gone or time up

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True

    def submit(self, job: Job) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _run(self) -> None:
        while not self.stopping:
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.limits.batch_window_s
            while len(batch) < self.limits.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            now = time.monotonic()
            batch = [j for j in batch if not j.cancelled and j.deadline > now]
            if not batch:
                continue
            try:
                self.batches += 1
                self.abandoned += decode(self.model, self.tok, batch, self.step_lock)
            except Exception as e:  # a bug must not kill the engine: fail these jobs only
                for j in batch:
                    j.emit("error", f"{type(e).__name__}: {e}")


def _keep_routes(jobs: list[Job], done: list[bool], ids: torch.Tensor, first: bool) -> None:
    """Give each row that still needed the last forward its own positions' expert ids (batch
    rows are never mixed): after the prefill its prompt (left padding dropped), after a step its
    last token. A row already done (finished, cancelled, or every expert revoked, when the
    forward ran it with experts it never chose) gets nothing from it."""
    for i, j in enumerate(jobs):
        if done[i]:
            continue
        if first:
            j.prompt_routes = ids[i, ids.shape[1] - len(j.ids) :]
        else:
            j.routes.append(ids[i, -1])


def _pick(logits: torch.Tensor, job: Job, gen: torch.Generator | None) -> int:
    if job.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / max(job.temperature, 1e-3), -1)
    if job.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < job.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def decode(model, tok, jobs: list[Job], lock: threading.RLock | None = None) -> int:
    """Greedy rows decode exactly as `generate` would alone; sampled rows use their own
    generator (seeded per request). Emits ("token", text) per new text piece and ("done", info).
    Rows of cancelled or expired requests stop at the next step; a row whose experts were all
    revoked meanwhile ends with finish_reason "revoked". Returns the number of rows abandoned."""
    device = next(model.parameters()).device
    b, length = len(jobs), max(len(j.ids) for j in jobs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((b, length), pad, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    for i, j in enumerate(jobs):
        ids[i, length - len(j.ids) :] = torch.tensor(j.ids)
        attn[i, length - len(j.ids) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    merged = jobs[0].mask is not None
    rows = torch.stack([j.mask for j in jobs]) if merged else None
    gens = []
    for j in jobs:
        g = None
        if j.temperature > 0:
            g = torch.Generator(device=device)
            g.manual_seed(j.seed if j.seed is not None else int(torch.randint(0, 2**62, ())))
        gens.append(g)
    done = [False] * b
    abandoned = 0
    finish = ["length"] * b
    texts = [""] * b
    sent = [0] * b
    cache = DynamicCache()
    n_exp = rows.shape[1] if merged else 0
    top_k = routers(model)[0].top_k if merged else 0
    shape = (len(routers(model)), top_k) if merged else (0, 0)
    for j in jobs:
        j.weights = torch.zeros(n_exp, dtype=torch.float64)
        j.prompt_routes = torch.full((len(j.ids), *shape), NO_EXPERT, dtype=torch.long)
        j.routes = []
    eos = tok.eos_token_id
    max_new = max(j.max_new for j in jobs)
    lock = lock or nullcontext()

    def forward(x, **kw):
        """One step under the lock, with each row's mask as it stands now (revocations in)."""
        with lock:
            if not merged:
                return model(x, **kw).logits[:, -1], []
            active = routers(model)[0].active.cpu()
            now = rows & active
            for i in range(b):
                if not now[i].any():  # every expert this row may use was revoked
                    if not done[i]:
                        done[i], finish[i] = True, "revoked"
                    now[i] = active
            with routing(model, rows=now, record=True) as records:
                return model(x, **kw).logits[:, -1], records

    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits, records = forward(
        ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
    )
    for step in range(max_new):
        if merged:  # what the last forward computed with; its last position makes this token
            routes = RoutingTrace(records, n_exp).routes(top_k, b)
            step_w = routes.step_weights()
            _keep_routes(jobs, done, routes.ids, first=step == 0)
        nxt = torch.full((b,), pad, dtype=torch.long)
        for i, j in enumerate(jobs):
            if done[i]:
                continue
            t = _pick(logits[i], j, gens[i])
            nxt[i] = t
            if t == eos:
                done[i], finish[i] = True, "stop"
            else:
                j.tokens.append(t)
                if merged:
                    j.weights += step_w[i]
                    j.top_expert.append(int(step_w[i].argmax()))
                text = tok.decode(j.tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in j.stop if s in text), default=-1)
                if cut >= 0:
                    text, done[i], finish[i] = text[:cut], True, "stop"
                texts[i] = text
                if len(j.tokens) >= j.max_new:
                    done[i] = True
            hold = 0 if done[i] else max((len(s) - 1 for s in j.stop), default=0)
            upto = max(sent[i], len(texts[i]) - hold)
            if upto > sent[i] and not texts[i].endswith("\ufffd"):
                j.emit("token", texts[i][sent[i] : upto])
                sent[i] = upto
            if not done[i] and (j.cancelled or time.monotonic() > j.deadline):
                done[i], abandoned = True, abandoned + 1
                finish[i] = finish[i] if j.cancelled else "timeout"  # the handler answers 504
        if all(done):
            break
        attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], 1)
        pos = attn.sum(-1, keepdim=True) - 1
        logits, records = forward(
            nxt[:, None].to(device),
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
    for i, j in enumerate(jobs):
        if sent[i] < len(texts[i]):
            j.emit("token", texts[i][sent[i] :])
        j.emit("done", {"text": texts[i], "finish_reason": finish[i]})
    return abandoned
