"""`flexmoe serve`: an OpenAI-compatible HTTP server where every request chooses its experts.

One model instance serves every request. An engine thread groups the requests waiting in a
bounded queue into one batch and decodes them together. Each batch row has its own expert mask
(model.routing rows), its own sampling generator and its own stop rules. Per request the API
takes `experts: {include, exclude}` and `use` (the official client sends them via
`extra_body`). Every answer carries `flexmoe: {active, excluded, attribution}`: the share of
routing weight each expert carried for the generated tokens.

Consent is checked on every request (expiry, allowed use, revocation). `POST
/admin/experts/{name}/revoke` takes an expert out of all later requests at once and is
persisted in the state directory. Tenants come from a keys file: API keys are stored as sha256
hashes and compared in constant time. Each request appends a JSON line to the usage ledger
(`flexmoe ledger summarize`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import queue
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from flexmoe.errors import FlexmoeError
from flexmoe.selection import unavailable
from flexmoe.store.merged import experts_of

STATIC = Path(__file__).parent / "static"


# ---------------------------------------------------------------- settings and tenants
@dataclass
class Limits:
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


@dataclass(frozen=True)
class Tenant:
    name: str
    experts: frozenset[str] | None  # None = every expert
    uses: frozenset[str]


OPEN = Tenant("anonymous", None, frozenset({"research", "commercial"}))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


HEX64 = r"^[0-9a-f]{64}$"


class TenantEntry(BaseModel):
    """One `[[tenants]]` table of the keys file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key_sha256: str = Field(pattern=HEX64)
    experts: list[str] = Field(["*"], max_length=256)
    uses: list[Literal["research", "commercial"]] = Field(["research", "commercial"], min_length=1)


class KeysFile(BaseModel):
    """The keys file: at least one tenant; anything unknown is refused (a typo such as
    `[[tenant]]` must never leave the server open)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    admin_key_sha256: str | None = Field(None, pattern=HEX64)
    tenants: list[TenantEntry] = Field(min_length=1, max_length=10_000)


class Keys:
    """The keys file (TOML): `admin_key_sha256 = "…"` and `[[tenants]]` tables with `name`,
    `key_sha256`, `experts` (names or ["*"]) and `uses`. Without a file every request is the
    anonymous tenant and the admin routes are closed. A file is validated strictly at startup:
    unknown tables or fields, no tenant, a malformed hash, a repeated name or key are refusals,
    so a keys file the server accepts always requires a key for every request."""

    def __init__(self, path: Path | None):
        self.path = path
        self.admin: str | None = None
        self.tenants: list[tuple[str, Tenant]] = []
        if path is None:
            return
        from pydantic import ValidationError

        from flexmoe.store.fsutil import regular_file

        try:
            raw = tomllib.loads(regular_file(path, "keys file", 1 << 20).read_text())
            parsed = KeysFile.model_validate(raw)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FlexmoeError(f"keys file {path}: {type(e).__name__}: {e}") from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "file"
            msg = "missing: the file must define at least one [[tenants]] table"
            if not (err["type"] == "missing" and loc == "tenants"):
                msg = err["msg"]
            raise FlexmoeError(f"keys file {path}: {loc}: {msg}") from None
        for what, values in (
            ("tenant name", [t.name for t in parsed.tenants]),
            ("key hash", [t.key_sha256 for t in parsed.tenants] + [parsed.admin_key_sha256]),
        ):
            given = [v for v in values if v is not None]
            if len(set(given)) != len(given):
                raise FlexmoeError(f"keys file {path}: a {what} is repeated")
        for t in parsed.tenants:
            self.tenants.append(
                (
                    t.key_sha256,
                    Tenant(
                        t.name,
                        None if "*" in t.experts else frozenset(t.experts),
                        frozenset(t.uses),
                    ),
                )
            )
        self.admin = parsed.admin_key_sha256

    @property
    def open(self) -> bool:
        return not self.tenants

    def check_experts(self, names: list[str]) -> None:
        """Refuse a tenant that names an expert the model does not have (a typo)."""
        for _, t in self.tenants:
            unknown = sorted((t.experts or set()) - set(names))
            if unknown:
                raise FlexmoeError(
                    f"keys file {self.path}: tenant {t.name!r} names unknown expert(s) "
                    f"{', '.join(map(repr, unknown))[:200]} (the model has {', '.join(names)})"
                )

    def tenant(self, key: str | None) -> Tenant | None:
        if self.open:
            return OPEN
        if not key:
            return None
        h = key_hash(key)
        found = None
        for stored, tenant in self.tenants:  # constant time per entry, every entry compared
            if hmac.compare_digest(stored, h):
                found = tenant
        return found

    def is_admin(self, key: str | None) -> bool:
        return bool(self.admin and key and hmac.compare_digest(self.admin, key_hash(key)))


# ---------------------------------------------------------------- the engine
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

    def emit(self, kind: str, payload: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


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
    from contextlib import nullcontext

    from transformers import DynamicCache

    from flexmoe.model.router import routers, routing

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
    for j in jobs:
        j.weights = torch.zeros(n_exp, dtype=torch.float64)
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
    for _ in range(max_new):
        if merged:  # routing weight of the position that produces this step's token
            per_layer = []
            for recs in records:
                index, value = recs[-1]
                index, value = (
                    index.view(b, -1, index.shape[-1]),
                    value.view(b, -1, value.shape[-1]),
                )
                w = torch.zeros(b, n_exp, dtype=torch.float64, device=index.device)
                w.scatter_add_(1, index[:, -1], value[:, -1].double())
                per_layer.append(w)
            step_w = torch.stack(per_layer).sum(0).cpu()
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


# ---------------------------------------------------------------- the request schema
class ExpertChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include: list[str] | None = Field(None, max_length=256)
    exclude: list[str] | None = Field(None, max_length=256)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=4)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    experts: ExpertChoice | None = None
    use: Literal["research", "commercial"] | None = None
    token_experts: bool = False  # per generated token: the expert with most routing weight


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(CompletionRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


# ---------------------------------------------------------------- the app
class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Server:
    """Model, tenants, consent state, ledger and metrics behind one FastAPI app."""

    def __init__(
        self,
        model_dir: Path,
        keys: Path | None = None,
        state_dir: Path | None = None,
        limits: Limits | None = None,
        device: str = "cpu",
    ):
        from flexmoe.data.tokenizer import load_tokenizer
        from flexmoe.model.device import place
        from flexmoe.store import revocations
        from flexmoe.store.merged import is_merged, load_model

        self.model_dir = Path(model_dir)
        self.keys = Keys(keys)  # refused before the model loads
        self.state_dir = revocations.state_dir(self.model_dir, state_dir)
        self.revoked: dict[str, str] = revocations.read_revoked(self.state_dir)
        self.model = place(load_model(self.model_dir, self.state_dir), device).eval()
        self.tok = load_tokenizer(self.model_dir)
        self.merged = is_merged(self.model)
        if self.merged:
            self.keys.check_experts(self.experts())
        self.limits = limits or Limits()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = self.state_dir / "ledger.jsonl"
        self.ledger_lock = threading.Lock()
        self.engine = Engine(self.model, self.tok, self.limits)
        self.name = self.model_dir.name
        self._metrics()

    # -- state
    def revoke(self, name: str) -> None:
        """Persist the revocation, then take the expert out of every row at the next step."""
        from flexmoe.model.router import set_active_experts
        from flexmoe.store import revocations

        with self.engine.step_lock:
            self.revoked = revocations.revoke(self.state_dir, self.revoked, name)
            withheld = experts_of(self.model).withheld
            withheld[name] = revocations.reason(self.revoked[name])
            set_active_experts(self.model, [n not in withheld for n in self.experts()])

    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "flexmoe_requests",
            "Requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.m_tokens = Counter(
            "flexmoe_tokens", "Tokens by kind", ["kind"], registry=self.registry
        )
        self.m_latency = Histogram(
            "flexmoe_request_seconds",
            "Request latency",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.m_routed = Counter(
            "flexmoe_expert_routed_tokens",
            "Generated tokens × routing share, per expert",
            ["expert"],
            registry=self.registry,
        )

    # -- experts and consent
    def experts(self) -> list[str]:
        from flexmoe.selection import expert_names

        return expert_names(self.model) if self.merged else []

    def availability(self, name: str, tenant: Tenant, use: str | None) -> str | None:
        """None if `tenant` may use expert `name` for `use` now, else the reason."""
        return unavailable(self.model, name, use, tenant.experts, tenant.name)

    def choose(self, req: CompletionRequest, tenant: Tenant):
        """(mask, active, excluded) for a request; 403/400 for what it may not ask."""
        from flexmoe.inference.preselect import default_preselect
        from flexmoe.selection import expert_mask

        if req.use is not None and req.use not in tenant.uses:
            raise ApiError(403, f"tenant '{tenant.name}' may not make '{req.use}' requests")
        if not self.merged:
            if req.experts and (req.experts.include or req.experts.exclude):
                raise ApiError(400, "this is a dense model: it has no experts to choose")
            return None, [], []
        names = self.experts()
        choice = req.experts or ExpertChoice()
        unknown = sorted((set(choice.include or []) | set(choice.exclude or [])) - set(names))
        if unknown:
            raise ApiError(400, f"unknown expert(s): {', '.join(unknown)}")
        for n in choice.include or []:
            reason = self.availability(n, tenant, req.use)
            if reason is not None:
                raise ApiError(403, f"expert '{n}' is not available: {reason}")
        excluded = [(n, "excluded by request") for n in choice.exclude or []]
        for n in names:
            if n in (choice.exclude or []):
                continue
            reason = self.availability(n, tenant, req.use)
            if reason is not None:
                excluded.append((n, reason))
        try:
            mask = expert_mask(self.model, choice.include, [n for n, _ in excluded])
        except FlexmoeError as e:
            raise ApiError(400, str(e)) from None
        pre = default_preselect(self.model)
        return mask, pre, excluded

    # -- one request
    async def run(self, req: CompletionRequest, prompt: str, tenant: Tenant, deadline: float):
        from flexmoe.inference.preselect import preselect_mask

        if req.max_tokens > self.limits.max_tokens:
            raise ApiError(
                400, f"max_tokens {req.max_tokens} exceeds the limit {self.limits.max_tokens}"
            )
        mask, pre, excluded = self.choose(req, tenant)
        if len(prompt) > 16 * self.limits.max_prompt_tokens:  # before tokenizing it
            raise ApiError(
                400, f"prompt is over the limit of {self.limits.max_prompt_tokens} tokens"
            )
        encoded = await asyncio.to_thread(self.tok, prompt, add_special_tokens=False)
        ids = encoded["input_ids"] or [self.tok.eos_token_id]
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt has {len(ids)} tokens, over the limit of {self.limits.max_prompt_tokens}",
            )
        if mask is not None and pre:  # request-level preselection, as `generate` does
            chosen = await asyncio.to_thread(preselect_mask, self.model, [prompt], pre, mask)
            mask = mask & chosen[0]
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(len(s) > 64 or not s for s in stop):
            raise ApiError(400, "stop: at most 4 non-empty strings of ≤ 64 characters")
        loop = asyncio.get_running_loop()
        job = Job(
            ids,
            mask,
            req.max_tokens,
            req.temperature,
            req.top_p,
            req.seed,
            stop,
            loop,
            asyncio.Queue(),
            deadline,
        )
        if not self.engine.submit(job):
            raise ApiError(503, "the request queue is full: retry later", "server_busy")
        names = self.experts()
        active = (
            [n for n, a in zip(names, mask.tolist(), strict=True) if a] if mask is not None else []
        )
        meta = {"active": active, "excluded": [{"name": n, "reason": r} for n, r in excluded]}
        return job, meta, len(ids)

    def finish(self, job: Job, meta: dict, tenant: Tenant, prompt_tokens: int, req) -> dict:
        from flexmoe.store.revocations import reason

        names = self.experts()
        gone = [n for n in meta["active"] if n in self.revoked]  # revoked while it ran: it
        if gone:  # was used up to that step only, and the attribution credits only that
            meta["active"] = [n for n in meta["active"] if n not in gone]
            meta["excluded"] += [
                {"name": n, "reason": reason(self.revoked[n]) + " (during this request)"}
                for n in gone
            ]
        if job.weights is not None and job.weights.sum() > 0:
            share = (job.weights / job.weights.sum()).tolist()
            meta["attribution"] = dict(zip(names, share, strict=True))
        else:
            meta["attribution"] = {n: 0.0 for n in names}
        if req.token_experts and names:
            meta["tokens"] = [
                {"text": self.tok.decode([t]), "expert": names[e]}
                for t, e in zip(job.tokens, job.top_expert, strict=False)
            ]
        n_out = len(job.tokens)
        self.m_tokens.labels("prompt").inc(prompt_tokens)
        self.m_tokens.labels("completion").inc(n_out)
        for n, s in meta["attribution"].items():
            if s:
                self.m_routed.labels(n).inc(s * n_out)
        rec = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "tenant": tenant.name,
            "active": meta["active"],
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_out,
            "attribution": meta["attribution"],
        }
        with self.ledger_lock, open(self.ledger, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        return meta


def _chat_prompt(server: Server, req: ChatRequest) -> str:
    if not getattr(server.tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
    msgs = [m.model_dump() for m in req.messages]
    return server.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def create_app(server: Server):
    """The FastAPI app (the engine thread starts and stops with it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(_app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="flexmoe", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(error_body(message, kind), status_code=status)

    def route(request: Request) -> str:  # the route template: request paths are unbounded
        r = request.scope.get("route")
        return getattr(r, "path", "other")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        server.m_requests.labels(route(request), str(e.status)).inc()
        return error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError):
        server.m_requests.labels(route(request), "400").inc()
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return error(400, f"{loc or 'body'}: {err.get('msg', 'invalid request')}")

    def bearer(request: Request) -> str | None:
        return _bearer(request.headers.get("authorization", ""))

    def tenant_of(request: Request) -> Tenant:
        t = server.keys.tenant(bearer(request))
        if t is None:
            raise ApiError(401, "missing or unknown API key", "authentication_error")
        return t

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": server.engine.jobs.qsize()}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(server.registry).decode())

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request):
        tenant_of(request)
        return {
            "object": "list",
            "data": [{"id": server.name, "object": "model", "owned_by": "flexmoe"}],
        }

    @app.get("/v1/experts")
    async def experts(request: Request, use: str | None = None):
        tenant = tenant_of(request)
        manifests = experts_of(server.model).manifests
        out = []
        for n in server.experts():
            m = manifests.get(n)
            reason = server.availability(n, tenant, use)
            out.append(
                {
                    "name": n,
                    "owner": m.owner if m else None,
                    "licence": m.licence if m else None,
                    "consent": json.loads(m.consent.model_dump_json()) if m else None,
                    "active": reason is None,
                    "reason": reason,
                }
            )
        return {"object": "list", "data": out}

    @app.post("/admin/experts/{name}/revoke")
    async def revoke(name: str, request: Request):
        if not server.keys.is_admin(bearer(request)):
            raise ApiError(403, "the admin key is required", "permission_error")
        if name not in server.experts():
            raise ApiError(404, f"no expert '{name}'")
        from flexmoe.store.merged import PUBLIC

        if name == PUBLIC:
            raise ApiError(400, "the public expert cannot be revoked")
        server.revoke(name)
        return {"revoked": name, "at": server.revoked[name]}

    async def serve(request: Request, req: CompletionRequest, prompt: str, chat: bool):
        started = time.perf_counter()
        deadline = request.scope.get("flexmoe.deadline", time.monotonic()) + server.limits.timeout_s
        tenant = tenant_of(request)
        job, meta, n_prompt = await server.run(req, prompt, tenant, deadline)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                body = {"role": "assistant", "content": text} if text is not None else {}
                return {"index": 0, key: body, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        watch = {"next": time.monotonic() + 0.25}  # when to look for a disconnect next

        async def next_event():
            """The engine's next event; ("error", …) once the whole request's time is up or
            a non-streaming client went away (its row is cancelled at the next step)."""
            while True:
                now = time.monotonic()
                if now >= deadline:
                    job.cancelled = True
                    return ("error", "timeout")
                # a streaming response watches for the disconnect itself (and cancels)
                if not req.stream and now >= watch["next"]:
                    watch["next"] = now + 0.25
                    if await request.is_disconnected():
                        job.cancelled = True
                        return ("error", "disconnected")
                try:
                    return await asyncio.wait_for(job.events.get(), min(deadline - now, 0.25))
                except TimeoutError:
                    pass

        if req.stream:

            async def events():
                try:
                    async for chunk in _events():
                        yield chunk
                finally:  # a client that went away: free its batch row
                    job.cancelled = True

            async def _events():
                while True:
                    kind, payload = await next_event()
                    if kind == "token":
                        chunk = {
                            "id": rid,
                            "object": obj + ".chunk" if chat else obj,
                            "created": created,
                            "model": server.name,
                            "choices": [choice(payload, None, True)],
                        }
                        yield f"data: {json.dumps(chunk)}\n\n"
                    elif kind == "done":
                        info = server.finish(job, meta, tenant, n_prompt, req)
                        chunk = {
                            "id": rid,
                            "object": obj + ".chunk" if chat else obj,
                            "created": created,
                            "model": server.name,
                            "choices": [
                                choice(None if chat else "", payload["finish_reason"], True)
                            ],
                            "usage": _usage(n_prompt, len(job.tokens)),
                            "flexmoe": info,
                        }
                        yield f"data: {json.dumps(chunk)}\n\n"
                        yield "data: [DONE]\n\n"
                        server.m_requests.labels(route(request), "200").inc()
                        server.m_latency.observe(time.perf_counter() - started)
                        return
                    else:
                        kind = "timeout" if payload == "timeout" else "server_error"
                        body = error_body(f"generation failed: {payload}", kind)
                        yield f"data: {json.dumps(body)}\n\n"
                        return

            return StreamingResponse(events(), media_type="text/event-stream")
        while True:
            kind, payload = await next_event()
            if kind == "done":
                break
            if kind == "error":
                status = {"timeout": 504, "disconnected": 499}.get(payload, 500)
                raise ApiError(status, f"generation failed: {payload}", "server_error")
        info = server.finish(job, meta, tenant, n_prompt, req)
        server.m_requests.labels(route(request), "200").inc()
        server.m_latency.observe(time.perf_counter() - started)
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": server.name,
            "choices": [choice(payload["text"], payload["finish_reason"], False)],
            "usage": _usage(n_prompt, len(job.tokens)),
            "flexmoe": info,
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
        return await serve(request, req, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tenant_of(request)
        return await serve(request, req, _chat_prompt(server, req), chat=True)

    return _Guard(app, server)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error shape, so the official clients show all of it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bearer(header: str) -> str | None:
    return header[7:].strip() if header[:7].lower() == "bearer " else None


class _Guard:
    """ASGI wrapper run before FastAPI touches a request: the API key is checked from the
    headers and the body is size-limited BEFORE it is read or parsed, so an unauthenticated or
    oversized body costs the server nothing. It also stamps the request's start (its deadline)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["flexmoe.deadline"] = time.monotonic()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        key = _bearer(headers.get(b"authorization", b"").decode("latin-1"))
        path = scope.get("path", "")
        keys = self.server.keys
        if path.startswith("/admin/") and not keys.is_admin(key):
            return await self._reply(send, 403, "the admin key is required", "permission_error")
        if path.startswith("/v1/") and keys.tenant(key) is None:
            return await self._reply(
                send, 401, "missing or unknown API key", "authentication_error"
            )
        limit = self.server.limits.max_body_bytes
        too_big = f"request body is over the limit of {limit:,} bytes"
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await self._reply(send, 400, "bad Content-Length header")
        if declared > limit:
            return await self._reply(send, 413, too_big)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await self._reply(send, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reply(self, send, status: int, message: str, kind="invalid_request_error"):
        self.server.m_requests.labels("guard", str(status)).inc()
        data = json.dumps(error_body(message, kind)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ---------------------------------------------------------------- the ledger
def summarize_ledger(path: Path) -> dict[str, dict[str, float]]:
    """{tenant: {expert: routed tokens}}: generated tokens × routing share, per expert and
    tenant — the basis for crediting data owners."""
    from flexmoe.data.shards import iter_jsonl

    out: dict[str, dict[str, float]] = {}
    for _, rec in iter_jsonl(Path(path)):
        if not isinstance(rec, dict):
            continue
        per = out.setdefault(str(rec.get("tenant")), {})
        n = float(rec.get("completion_tokens") or 0)
        for expert, share in (rec.get("attribution") or {}).items():
            per[expert] = per.get(expert, 0.0) + n * float(share)
    return out
