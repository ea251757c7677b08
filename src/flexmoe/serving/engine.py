"""The engine: one thread that decodes the running requests together, each with its own experts.

One model instance serves every request. Requests wait in a bounded queue (full: the caller
answers 503). With continuous batching (the default) a request joins the running decode at the
next step and leaves it as soon as it finishes, so a short answer never waits for a long one;
with static batching (`Limits.batching = "static"`) the engine takes the waiting requests as one
batch and decodes them until the longest finishes (`decode`). Either way each batch row has its
own expert mask (model.routing rows), its own sampling generator and its own stop rules, and
records the routing weight each expert carried for its generated tokens (the attribution) and,
from the same record, the expert ids each of its own positions was computed with (vLLM's
`routed_experts` layout: see `Job.routed_experts`).
Every forward holds `step_lock`, so a revocation takes effect for every running row at the next
step, never in the middle of one; rows of cancelled or expired requests stop at the next step.

The continuous scheduler is written here, over one left-padded `DynamicCache`, rather than taken
from transformers (`generate_batch`, `ContinuousBatchingManager`): that one packs the tokens of
all requests into a single ragged sequence (batch 1, paged attention), while flexmoe's routers
mask experts per batch row (`routing(rows=…)`, one mask per request) and record per row. There,
every request's mask would have to become a per-token mask and its routing record be cut back out
of the packed tokens; keeping one padded row per request keeps the router, its records and the
exactness of an opt-out as they are.
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
import torch.nn.functional as F
from transformers import DynamicCache

from flexmoe.model.router import NO_EXPERT, RoutedExperts, RoutingTrace, routers, routing

BATCHING = ("continuous", "static")


@dataclass
class Limits:
    """The server's bounds: the engine's queue and batch, and each request's size and time."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    queue_size: int = 64
    max_batch: int = 16  # rows decoded together (continuous: running at once)
    batch_window_s: float = 0.005
    timeout_s: float = 120.0  # the whole request: queueing, prefill and every token
    batching: str = "continuous"  # or "static": whole batches, until the longest row finishes

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}: {self.batching!r}")

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
    """A thread that decodes the waiting jobs together (up to max_batch rows), one forward per
    step with the KV cache: continuously (a job joins at the next step and leaves when done) or
    in static batches (`Limits.batching`). Each forward holds `step_lock`: a revocation
    (set_active_experts under the same lock) takes effect for every running row at the next
    step, never in the middle of one."""

    def __init__(self, model, tokenizer, limits: Limits):
        self.model, self.tok, self.limits = model, tokenizer, limits
        self.step_lock = threading.RLock()
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=limits.queue_size)
        self.thread = threading.Thread(target=self._run, name="flexmoe-engine", daemon=True)
        self.stopping = False
        self.batches = 0  # static: batches decoded; continuous: admissions of newcomers
        self.steps = 0  # decode steps (one forward each, prefills not counted)
        self.abandoned = 0  # rows stopped early: client gone or time up
        rs = routers(model)
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.n_exp = rs[0].num_experts if rs else 0
        self.top_k = rs[0].top_k if rs else 0
        self.shape = (len(rs), self.top_k) if rs else (0, 0)  # one position's routes

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
        if self.limits.batching == "static":
            self._run_static()
        else:
            self._run_continuous()

    def _take(self, room: int, wait: bool) -> list[Job]:
        """Up to `room` waiting jobs that are still wanted. wait: block (0.1 s) for a first
        one, then gather others for batch_window_s; else only those already waiting (running
        rows never wait for newcomers)."""
        jobs: list[Job] = []
        if wait:
            try:
                jobs.append(self.jobs.get(timeout=0.1))
            except queue.Empty:
                return jobs
        until = time.monotonic() + (self.limits.batch_window_s if wait else 0.0)
        while len(jobs) < room:
            left = until - time.monotonic()
            try:
                jobs.append(self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        return [j for j in jobs if not j.cancelled and j.deadline > now]

    def _run_static(self) -> None:
        while not self.stopping:
            batch = self._take(self.limits.max_batch, wait=True)
            if not batch:
                continue
            try:
                self.batches += 1
                self.abandoned += decode(self.model, self.tok, batch, self.step_lock)
            except Exception as e:  # a bug must not kill the engine: fail these jobs only
                _fail(batch, e)

    @torch.no_grad()
    def _run_continuous(self) -> None:
        """Each turn: admit the waiting jobs (prefilled in their own forward, then joined to the
        running batch), then one decode step for every running row. Rows leave as they end; on
        stop, the running rows finish and no newcomer is admitted."""
        running = _Batch()
        while not self.stopping or running.rows:
            room = self.limits.max_batch - len(running.rows)
            fresh = [] if self.stopping or room <= 0 else self._take(room, not running.rows)
            if fresh:
                self.batches += 1
                try:
                    running.join(self._prefill(fresh))
                except Exception as e:  # a bug must not kill the engine: fail these jobs only
                    _fail(fresh, e)
            if running.rows:
                try:
                    self._step(running)
                except Exception as e:  # the running cache is lost: fail its rows
                    _fail([r.job for r in running.rows], e)
                    running = _Batch()

    def _row(self, job: Job) -> _Row:
        mask = job.mask
        if mask is None and self.n_exp:  # a merged model's job with no choice: every expert
            mask = torch.ones(self.n_exp, dtype=torch.bool)
        return _Row(job, self.tok, mask, self.n_exp, self.shape, self.device)

    def _prefill(self, jobs: list[Job]) -> _Batch:
        """The newcomers' prompts, left-padded among themselves, in their own forward and cache;
        each row's first token comes from it."""
        ids, attn = _left_padded([j.ids for j in jobs], self.pad, self.device)
        batch = _Batch([self._row(j) for j in jobs], DynamicCache(), attn)
        logits, routes = self._forward(batch, ids, (attn.cumsum(-1) - 1).clamp(min=0))
        if routes is not None:
            for i, r in enumerate(batch.rows):
                if not r.done:  # a row revoked before its prefill chose nothing
                    r.job.prompt_routes = routes.ids[i, ids.shape[1] - len(r.job.ids) :]
        self._advance(batch, logits, routes)
        return batch

    def _step(self, batch: _Batch) -> None:
        """One decode step: every running row feeds its last token, at its own next position."""
        self.steps += 1
        x = torch.tensor([[r.next] for r in batch.rows], dtype=torch.long, device=self.device)
        batch.attn = F.pad(batch.attn, (0, 1), value=1)
        logits, routes = self._forward(batch, x, batch.attn.sum(-1, keepdim=True) - 1)
        if routes is not None:
            for i, r in enumerate(batch.rows):
                if not r.done:
                    r.job.routes.append(routes.ids[i, -1])
        self._advance(batch, logits, routes)

    def _advance(self, batch: _Batch, logits: torch.Tensor, routes: RoutedExperts | None) -> None:
        """Each live row takes its next token; the rows that ended leave the batch."""
        step_w = routes.step_weights() if routes is not None else None
        for i, r in enumerate(batch.rows):
            if not r.done:
                self.abandoned += r.take(logits[i], None if step_w is None else step_w[i])
        batch.retire()

    def _forward(
        self, batch: _Batch, x: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, RoutedExperts | None]:
        """One forward under the lock, each row with its mask as it stands now (revocations in):
        a row left with no expert ends "revoked" (it is run with the active experts, never
        credited). The last position's logits and what each position was routed to."""
        kw = dict(attention_mask=batch.attn, position_ids=pos, past_key_values=batch.cache)
        with self.step_lock:
            if not self.n_exp:
                return self.model(x, use_cache=True, logits_to_keep=1, **kw).logits[:, -1], None
            active = routers(self.model)[0].active.cpu()
            now = torch.stack([r.mask for r in batch.rows]) & active
            for i, r in enumerate(batch.rows):
                if not now[i].any():  # every expert this row may use was revoked
                    r.done, r.finish = True, "revoked"
                    now[i] = active
            with routing(self.model, rows=now, record=True) as records:
                logits = self.model(x, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
        return logits, RoutingTrace(records, self.n_exp).routes(self.top_k, len(batch.rows))


class _Row:
    """One job's decoding state, the same under both schedulers: its mask and sampler, the
    text streamed so far, and why it ended."""

    def __init__(self, job: Job, tok, mask, n_exp: int, shape: tuple[int, int], device):
        self.job, self.tok, self.mask = job, tok, mask
        self.gen = None
        if job.temperature > 0:  # its own generator: a seeded request samples the same batched
            self.gen = torch.Generator(device=device)
            seed = job.seed if job.seed is not None else int(torch.randint(0, 2**62, ()))
            self.gen.manual_seed(seed)
        self.done, self.finish = False, "length"
        self.text, self.sent = "", 0
        self.next = 0  # the token to feed at the next step
        job.weights = torch.zeros(n_exp, dtype=torch.float64)
        job.prompt_routes = torch.full((len(job.ids), *shape), NO_EXPERT, dtype=torch.long)
        job.routes = []

    def take(self, logits: torch.Tensor, step_w: torch.Tensor | None) -> bool:
        """Pick the next token from this row's logits (and credit the experts that made it),
        apply the stop rules, stream what is safe to send. True if the row was abandoned now:
        its client went away or its time is up."""
        j = self.job
        self.next = t = _pick(logits, j, self.gen)
        if t == self.tok.eos_token_id:
            self.done, self.finish = True, "stop"
        else:
            j.tokens.append(t)
            if step_w is not None:
                j.weights += step_w
                j.top_expert.append(int(step_w.argmax()))
            text = self.tok.decode(j.tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in j.stop if s in text), default=-1)
            if cut >= 0:
                text, self.done, self.finish = text[:cut], True, "stop"
            self.text = text
            if len(j.tokens) >= j.max_new:
                self.done = True
        self.stream()
        if not self.done and (j.cancelled or time.monotonic() > j.deadline):
            self.done = True
            self.finish = self.finish if j.cancelled else "timeout"  # the handler answers 504
            return True
        return False

    def stream(self) -> None:
        """Send the new text, holding back what could still turn into a stop string (and a
        partial UTF-8 character)."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.job.stop), default=0)
        upto = max(self.sent, len(self.text) - hold)
        if upto > self.sent and not self.text.endswith("\ufffd"):
            self.job.emit("token", self.text[self.sent : upto])
            self.sent = upto

    def close(self) -> None:
        if self.sent < len(self.text):
            self.job.emit("token", self.text[self.sent :])
        self.job.emit("done", {"text": self.text, "finish_reason": self.finish})


@dataclass
class _Batch:
    """The running rows, in batch order, with their KV cache and attention mask: every row's
    tokens are right-aligned (left padding, 0 in the mask), so a row's positions come from its
    mask (cumsum − 1) whatever the cache's width."""

    rows: list[_Row] = field(default_factory=list)
    cache: DynamicCache = field(default_factory=DynamicCache)
    attn: torch.Tensor | None = None  # (rows, columns) long, as wide as the cache

    def join(self, other: _Batch) -> None:
        """Take `other`'s rows: the narrower of the two caches is left-padded to the wider."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.attn = other.rows, other.cache, other.attn
            return
        width = max(self.attn.shape[1], other.attn.shape[1])
        self.attn = torch.cat([_left_pad(self.attn, width), _left_pad(other.attn, width)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self.rows += other.rows

    def retire(self) -> None:
        """Answer the rows that ended and drop them from the cache, then trim the columns that
        are padding for every row left."""
        for r in self.rows:
            if r.done:
                r.close()
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.attn = DynamicCache(), None
            return
        index = torch.tensor(keep, device=self.attn.device)
        attn = self.attn[index]
        start = attn.shape[1] - int(attn.sum(-1).max())
        self.attn = attn[:, start:]
        for layer in self.cache.layers:  # (batch, kv heads, columns, head dim)
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` with zero columns on the left of its sequence dimension (a mask's last, a cache
    layer's third: (batch, heads, columns, head dim)) up to `width`."""
    dim = 1 if t.dim() == 2 else 2
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (rows, longest prompt), each prompt right-aligned."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        attn[i, length - len(p) :] = 1
    return ids.to(device), attn.to(device)


def _fail(jobs: list[Job], e: Exception) -> None:
    for j in jobs:
        j.emit("error", f"{type(e).__name__}: {e}")


def _keep_routes(rows: list[_Row], ids: torch.Tensor, first: bool) -> None:
    """Give each row that still needed the last forward its own positions' expert ids (batch
    rows are never mixed): after the prefill its prompt (left padding dropped), after a step its
    last token. A row already done (finished, cancelled, or every expert revoked, when the
    forward ran it with experts it never chose) gets nothing from it."""
    for i, r in enumerate(rows):
        if r.done:
            continue
        if first:
            r.job.prompt_routes = ids[i, ids.shape[1] - len(r.job.ids) :]
        else:
            r.job.routes.append(ids[i, -1])


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
    """Static batching: the jobs as one batch, decoded until the longest is done. Greedy rows
    decode exactly as `generate` would alone; sampled rows use their own generator (seeded per
    request). Emits ("token", text) per new text piece and ("done", info). Rows of cancelled or
    expired requests stop at the next step; a row whose experts were all revoked meanwhile ends
    with finish_reason "revoked". Returns the number of rows abandoned."""
    device = next(model.parameters()).device
    b = len(jobs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, attn = _left_padded([j.ids for j in jobs], pad, device)
    merged = jobs[0].mask is not None
    n_exp = jobs[0].mask.shape[0] if merged else 0
    top_k = routers(model)[0].top_k if merged else 0
    shape = (len(routers(model)), top_k) if merged else (0, 0)
    rows = [_Row(j, tok, j.mask, n_exp, shape, device) for j in jobs]
    masks = torch.stack([j.mask for j in jobs]) if merged else None
    abandoned = 0
    cache = DynamicCache()
    lock = lock or nullcontext()

    def forward(x, **kw):
        """One step under the lock, with each row's mask as it stands now (revocations in)."""
        with lock:
            if not merged:
                return model(x, **kw).logits[:, -1], []
            active = routers(model)[0].active.cpu()
            now = masks & active
            for i, r in enumerate(rows):
                if not now[i].any():  # every expert this row may use was revoked
                    if not r.done:
                        r.done, r.finish = True, "revoked"
                    now[i] = active
            with routing(model, rows=now, record=True) as records:
                return model(x, **kw).logits[:, -1], records

    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits, records = forward(
        ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
    )
    for step in range(max(j.max_new for j in jobs)):
        step_w = None
        if merged:  # what the last forward computed with; its last position makes this token
            routes = RoutingTrace(records, n_exp).routes(top_k, b)
            step_w = routes.step_weights()
            _keep_routes(rows, routes.ids, first=step == 0)
        nxt = torch.full((b,), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if r.done:
                continue
            abandoned += r.take(logits[i], None if step_w is None else step_w[i])
            nxt[i] = r.next
        if all(r.done for r in rows):
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
    for r in rows:
        r.close()
    return abandoned
