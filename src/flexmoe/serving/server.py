"""The `Server`: one model, its tenants, consent state, ledger and metrics, behind the app.

`flexmoe serve` is an OpenAI-compatible HTTP server where every request chooses its experts
(`experts: {include, exclude}` and `use`); every answer carries `flexmoe: {active, excluded,
attribution}`. This module holds the request-independent state and the per-request steps that
need it. Consent is checked on every request (expiry, allowed use, revocation, the tenant's
experts): what a request may not ask is refused (403/400), never silently widened. A revocation
is persisted in the state directory first, then takes the expert out of every running row at
the next decode step (under the engine's step lock); the ledger credits it only for what it made.
The model loads only after the keys file has been accepted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.inference.preselect import default_preselect, preselect_mask
from flexmoe.model.device import place
from flexmoe.model.router import set_active_experts
from flexmoe.selection import expert_mask, expert_names, unavailable
from flexmoe.serving.db import StateDB, database_url
from flexmoe.serving.engine import Engine, Job, Limits
from flexmoe.serving.schema import ApiError, CompletionRequest, ExpertChoice
from flexmoe.serving.tenants import Keys, Tenant, check_experts, read_keys_file
from flexmoe.store import revocations
from flexmoe.store.merged import experts_of, is_merged, load_model
from flexmoe.store.signing import load_private_key

__all__ = ["Limits", "Server"]
log = logging.getLogger("flexmoe.serve")


class Server:
    """Model, tenants, consent state, ledger and metrics behind one FastAPI app."""

    def __init__(
        self,
        model_dir: Path,
        keys: Path | None = None,
        state_dir: Path | None = None,
        limits: Limits | None = None,
        device: str = "auto",
        db: str | None = None,
        signing_key: Path | None = None,
        checkpoint_every: int = 64,
        checkpoint_seconds: float = 10.0,
    ):
        self.model_dir = Path(model_dir)
        imported = read_keys_file(keys) if keys is not None else None  # before anything else
        self.signer = load_private_key(signing_key) if signing_key is not None else None
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self.state_dir = revocations.state_dir(self.model_dir, state_dir)
        self.model = place(load_model(self.model_dir, self.state_dir), device).eval()
        self.tok = load_tokenizer(self.model_dir)
        self.merged = is_merged(self.model)
        if self.merged and imported is not None:  # refused before anything is written
            check_experts(imported[0], self.experts(), f"keys file {keys}")
        self.db = StateDB(database_url(db, self.state_dir))
        self.keys = Keys(self.db, imported, keys)
        if self.merged:
            check_experts(self.db.all_tenants(), self.experts(), "the state database")
        self.revoked = self._shared_revocations()  # the state directory's file holds them too
        self._withhold(self.revoked)
        self.limits = limits or Limits()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine = Engine(self.model, self.tok, self.limits)
        self.name = self.model_dir.name
        self.owners = self._owners()
        self._metrics()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="flexmoe-state", daemon=True)

    # -- lifecycle
    def start(self) -> None:
        self.engine.start()
        self._watcher.start()

    def close(self) -> None:
        """Stop the engine and the watcher; sign a last checkpoint over every row written."""
        self.engine.stop()
        self._stop.set()
        if self.signer is not None:
            try:
                self.db.checkpoint(self.signer)
            except Exception as e:  # the database is down: the next replica's checkpoint covers it
                log.warning("final ledger checkpoint: %s", str(e).splitlines()[0][:300])

    def _watch(self) -> None:
        """Revocations made through other replicas reach the running rows within a second;
        a checkpoint is signed every `checkpoint_seconds` while new rows arrive."""
        last = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                self.sync_revocations()
                if self.signer and time.monotonic() - last >= self.checkpoint_seconds:
                    self.db.checkpoint(self.signer)
                    last = time.monotonic()
            except Exception as e:  # the database is down: requests fail closed meanwhile
                log.warning("state database: %s", str(e).splitlines()[0][:300])

    # -- state
    def _shared_revocations(self) -> dict[str, str]:
        """The database's revocations and this state directory's `revoked.json`, united in
        both (an older flexmoe's file is imported; offline commands read the file)."""
        local = revocations.read_revoked(self.state_dir)
        for name, at in local.items():
            self.db.revoke(name, at)
        shared = self.db.revoked()
        for name, at in shared.items():
            if local.get(name) != at:
                local = revocations.revoke(self.state_dir, local, name, at)
        return shared

    def sync_revocations(self) -> None:
        """Apply revocations another replica recorded (each request calls this first)."""
        shared = self.db.revoked()
        for name in set(shared) - set(self.revoked):
            self._apply_revocation(name, shared[name])

    def revoke(self, name: str) -> None:
        """Persist the revocation (database, then this state directory), then take the expert
        out of every row at the next step."""
        self._apply_revocation(name, self.db.revoke(name, revocations.now()))

    def _apply_revocation(self, name: str, at: str) -> None:
        with self.engine.step_lock:
            if name in self.revoked:
                return
            self.revoked = revocations.revoke(self.state_dir, self.revoked, name, at)
            self._withhold({name: at})

    def _withhold(self, revoked: dict[str, str]) -> None:
        """Take the model's revoked experts out of routing (under the step lock when serving)."""
        names = self.experts()
        withheld = experts_of(self.model).withheld if self.merged else {}
        withheld |= {n: revocations.reason(at) for n, at in revoked.items() if n in names}
        if names:
            set_active_experts(self.model, [n not in withheld for n in names])

    def _owners(self) -> dict[str, str]:
        manifests = experts_of(self.model).manifests if self.merged else {}
        return {n: (manifests[n].owner if n in manifests else n) for n in self.experts()}

    def _metrics(self) -> None:
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
        return expert_names(self.model) if self.merged else []

    def availability(self, name: str, tenant: Tenant, use: str | None) -> str | None:
        """None if `tenant` may use expert `name` for `use` now, else the reason."""
        return unavailable(self.model, name, use, tenant.experts, tenant.name)

    def choose(self, req: CompletionRequest, tenant: Tenant):
        """(mask, active, excluded) for a request; 403/400 for what it may not ask."""
        if req.use is not None and req.use not in tenant.uses:
            raise ApiError(
                403, f"tenant '{tenant.name}' may not make '{req.use}' requests", param="use"
            )
        if not self.merged:
            if req.experts and (req.experts.include or req.experts.exclude):
                raise ApiError(
                    400, "this is a dense model: it has no experts to choose", param="experts"
                )
            return None, [], []
        names = self.experts()
        choice = req.experts or ExpertChoice()
        unknown = sorted((set(choice.include or []) | set(choice.exclude or [])) - set(names))
        if unknown:
            raise ApiError(400, f"unknown expert(s): {', '.join(unknown)}", param="experts")
        for n in choice.include or []:
            reason = self.availability(n, tenant, req.use)
            if reason is not None:
                raise ApiError(403, f"expert '{n}' is not available: {reason}", param="experts")
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
            raise ApiError(400, str(e), param="experts") from None
        pre = default_preselect(self.model)
        return mask, pre, excluded

    # -- per-tenant limits
    def admit(self, tenant: Tenant) -> None:
        """429 with Retry-After when the tenant is over its requests per minute or tokens per
        UTC day, counted in the database so the limits hold across replicas."""
        now = dt.datetime.now(dt.UTC)
        if tenant.tokens_per_day is not None:
            used = self.db.tokens_today(tenant.name, now)
            if used >= tenant.tokens_per_day:
                midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0)
                wait = math.ceil((midnight - now).total_seconds())
                raise ApiError(
                    429,
                    f"tenant '{tenant.name}' used its {tenant.tokens_per_day:,} tokens for today",
                    "rate_limit_error",
                    code="tokens_per_day",
                    headers={"Retry-After": str(max(wait, 1))},
                )
        if tenant.requests_per_minute is not None:
            n = self.db.count_request(tenant.name, now)
            if n > tenant.requests_per_minute:
                wait = 60 - now.second
                raise ApiError(
                    429,
                    f"tenant '{tenant.name}' is over {tenant.requests_per_minute} requests "
                    "per minute",
                    "rate_limit_error",
                    code="requests_per_minute",
                    headers={"Retry-After": str(max(wait, 1))},
                )

    # -- one request
    async def run(self, req: CompletionRequest, prompt: str, tenant: Tenant, deadline: float):
        await asyncio.to_thread(self.sync_revocations)
        await asyncio.to_thread(self.admit, tenant)
        if req.max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {req.max_tokens} exceeds the limit {self.limits.max_tokens}",
                param="max_tokens",
            )
        mask, pre, excluded = self.choose(req, tenant)
        field = "messages" if hasattr(req, "messages") else "prompt"
        if len(prompt) > 16 * self.limits.max_prompt_tokens:  # before tokenizing it
            raise ApiError(
                400,
                f"prompt is over the limit of {self.limits.max_prompt_tokens} tokens",
                param=field,
            )
        encoded = await asyncio.to_thread(self.tok, prompt, add_special_tokens=False)
        ids = encoded["input_ids"] or [self.tok.eos_token_id]
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt has {len(ids)} tokens, over the limit of {self.limits.max_prompt_tokens}",
                param=field,
            )
        if mask is not None and pre:  # request-level preselection, as `generate` does
            chosen = await asyncio.to_thread(
                preselect_mask, self.model, [prompt], pre, mask, self.tok
            )
            mask = mask & chosen[0]
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])  # checked
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

    def finish(
        self, job: Job, meta: dict, tenant: Tenant, prompt_tokens: int, req, request_id: str
    ) -> dict:
        """The answer's `flexmoe` block; its ledger row is committed before this returns (the
        caller sends the response after it)."""
        names = self.experts()
        gone = [n for n in meta["active"] if n in self.revoked]  # revoked while it ran: it
        if gone:  # was used up to that step only, and the attribution credits only that
            meta["active"] = [n for n in meta["active"] if n not in gone]
            meta["excluded"] += [
                {
                    "name": n,
                    "reason": revocations.reason(self.revoked[n]) + " (during this request)",
                }
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
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "tenant": tenant.name,
            "active": meta["active"],
            "owners": self.owners,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_out,
            "attribution": meta["attribution"],
        }
        self.db.append(record, prompt_tokens + n_out, self.signer, self.checkpoint_every)
        return meta
