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
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.inference.preselect import default_preselect, preselect_mask
from flexmoe.model.device import place
from flexmoe.model.router import set_active_experts
from flexmoe.selection import expert_mask, expert_names, unavailable
from flexmoe.serving.engine import Engine, Job, Limits
from flexmoe.serving.ledger import Ledger
from flexmoe.serving.schema import ApiError, CompletionRequest, ExpertChoice
from flexmoe.serving.tenants import Keys, Tenant
from flexmoe.store import revocations
from flexmoe.store.merged import experts_of, is_merged, load_model

__all__ = ["Limits", "Server"]


class Server:
    """Model, tenants, consent state, ledger and metrics behind one FastAPI app."""

    def __init__(
        self,
        model_dir: Path,
        keys: Path | None = None,
        state_dir: Path | None = None,
        limits: Limits | None = None,
        device: str = "auto",
    ):
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
        self.ledger = Ledger(self.state_dir / "ledger.jsonl")
        self.engine = Engine(self.model, self.tok, self.limits)
        self.name = self.model_dir.name
        self._metrics()

    # -- state
    def revoke(self, name: str) -> None:
        """Persist the revocation, then take the expert out of every row at the next step."""
        with self.engine.step_lock:
            self.revoked = revocations.revoke(self.state_dir, self.revoked, name)
            withheld = experts_of(self.model).withheld
            withheld[name] = revocations.reason(self.revoked[name])
            set_active_experts(self.model, [n not in withheld for n in self.experts()])

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

    # -- one request
    async def run(self, req: CompletionRequest, prompt: str, tenant: Tenant, deadline: float):
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
            chosen = await asyncio.to_thread(preselect_mask, self.model, [prompt], pre, mask)
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

    def finish(self, job: Job, meta: dict, tenant: Tenant, prompt_tokens: int, req) -> dict:
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
        self.ledger.record(tenant.name, meta["active"], prompt_tokens, n_out, meta["attribution"])
        return meta
