"""The HTTP side of `flexmoe serve`: the FastAPI routes and the guard in front of them.

The server never fails open. `_Guard` runs before FastAPI touches a request: the API key (or the
admin key, for `/admin/`) is checked from the headers and the body is size-limited BEFORE it is
read or parsed, so an unauthenticated or oversized request costs nothing; the routes check the
tenant again. `/v1/completions` and `/v1/chat/completions` (streaming or not) answer with the
generated text plus `flexmoe: {active, excluded, attribution}`; `POST
/admin/experts/{name}/revoke` takes an expert out of all later requests and of the running ones
at their next step. `--timeout` bounds the whole request (queueing, prefill and every token: 504),
and a client that goes away has its batch row cancelled at the next step. With
`return_routed_experts: true` (not streaming) the answer also carries vLLM's routing-replay fields:
the choice's `routed_experts` and `prompt_routed_experts` ([tokens][MoE layers][top-k] expert ids,
-1 for an empty slot), `prompt_routed_experts` at the top level as vLLM places it, and
`expert_names` (id → name).

Requests are validated strictly (see `schema`): a body that is not a JSON object, a field of the
wrong type, an unknown or unimplemented parameter, text that is not valid Unicode is a 400 whose
`param` names the field; a `model` other than the one served is a 404 (`model_not_found`), as
OpenAI answers; a completion body sent as anything but JSON is a 415. Every error, the guard's
401/403/413 and Starlette's 404/405 included, has OpenAI's shape `{"error": {"message", "type",
"param", "code"}}`; an unexpected exception is a 500 saying only "internal server error".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from flexmoe.serving.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    error_body,
    field_names,
    usage,
)
from flexmoe.serving.server import Server
from flexmoe.serving.tenants import Tenant
from flexmoe.store.merged import PUBLIC, experts_of

STATIC = Path(__file__).parent / "static"  # the browser page served at `/`


JSON_ROUTES = ("/v1/completions", "/v1/chat/completions")  # their bodies must be JSON
FIELDS = field_names()


def _chat_prompt(server: Server, req: ChatRequest) -> str:
    if not getattr(server.tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
    msgs = [{"role": m.role, "content": m.text} for m in req.messages]
    try:
        return server.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template refuses these messages (jinja's `raise_exception`)
        if not type(e).__module__.startswith("jinja2"):
            raise
        raise ApiError(
            400, f"the chat template refused the messages: {e}", param="messages"
        ) from None


def _validation_error(errors: list[dict]) -> tuple[str, str | None, str]:
    """(message, param, code) for pydantic's errors on a request body, in OpenAI's words.

    The first error is reported; of the errors on the same field, the deepest (an element of a
    list rather than the list). Locations drop "body" and pydantic's union tags ("str",
    "list[str]"), so `param` is the field as the client wrote it (`messages.0.role`)."""
    if not errors:
        return "invalid request", None, "invalid_value"

    def where(err: dict) -> list:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        last = loc[-1:] if err.get("type") == "extra_forbidden" else []
        keep = [x for x in loc[: len(loc) - len(last)] if isinstance(x, int) or x in FIELDS]
        return keep + last

    first = where(errors[0])
    same = [e for e in errors if where(e)[:1] == first[:1]]
    err = max(same, key=lambda e: len(where(e)))
    loc, kind = where(err), err.get("type", "")
    param = ".".join(map(str, loc)) or (err.get("ctx") or {}).get("param")
    param = None if param is None else str(param)
    msgs = [e.get("msg", "invalid") for e in same if where(e) == loc]
    msg = " or ".join(dict.fromkeys(m[:1].lower() + m[1:] for m in msgs))
    if kind == "json_invalid":
        error = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {error}", None, "invalid_json"
    if kind == "extra_forbidden":
        return f"Unknown parameter: '{param}'.", param, "unknown_parameter"
    if kind == "unsupported_parameter":
        return err.get("msg", ""), param, "unsupported_parameter"
    if kind == "missing":
        if not loc:  # no body, or `null`
            return "the request body must be a JSON object", None, "invalid_type"
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind == "string_unicode":  # pydantic could not read a text (a name) at all
        what = param or "a parameter name"
        return f"{what} is not valid Unicode (a lone surrogate)", param, "invalid_value"
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None, "invalid_type"
    if kind.startswith("unsupported_"):
        code = "unsupported_value"
    else:
        code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return (f"{param}: {msg}" if param else msg[:1].upper() + msg[1:]), param, code


def create_app(server: Server):
    """The FastAPI app (the engine thread starts and stops with it)."""

    @asynccontextmanager
    async def lifespan(_app):
        server.start()
        yield
        server.close()

    app = FastAPI(title="flexmoe", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> JSONResponse:
        body = error_body(message, kind, param, code)
        return JSONResponse(body, status_code=status, headers=headers)

    def route(request: Request) -> str:  # the route template: request paths are unbounded
        r = request.scope.get("route")
        return getattr(r, "path", "other")

    # Every error the app answers has OpenAI's shape: its own (ApiError), a request that does
    # not validate (400, never FastAPI's 422), Starlette's (404 unknown route, 405 wrong
    # method, 400 unparsable body) and anything unexpected (500, no details leaked).
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        server.m_requests.labels(route(request), str(e.status)).inc()
        return error(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError):
        server.m_requests.labels(route(request), "400").inc()
        message, param, code = _validation_error(list(e.errors()))
        return error(400, message, param=param, code=code)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        server.m_requests.labels(route(request), str(e.status_code)).inc()
        where = f"{request.method} {request.url.path}"
        message = {404: f"Invalid URL ({where})", 405: f"Method not allowed ({where})"}.get(
            e.status_code, str(e.detail)
        )
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        return error(e.status_code, message, kind, headers=e.headers)

    @app.exception_handler(SQLAlchemyError)
    async def _db_down(request: Request, e: SQLAlchemyError):  # fail closed, say why
        server.m_requests.labels(route(request), "503").inc()
        return error(503, "the state database is unavailable: retry later", "server_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # logged by uvicorn, never sent
        server.m_requests.labels(route(request), "500").inc()
        return error(500, "internal server error", "server_error")

    def bearer(request: Request) -> str | None:
        return _bearer(request.headers.get("authorization", ""))

    def tenant_of(request: Request) -> Tenant:
        t = request.scope.get("flexmoe.tenant") or server.keys.tenant(bearer(request))
        if t is None:
            raise ApiError(
                401, "missing or unknown API key", "authentication_error", code="invalid_api_key"
            )
        return t

    def check_model(req: CompletionRequest | ChatRequest) -> None:
        """The model asked for is the one served (absent: that one); else 404, as OpenAI."""
        if req.model is not None and req.model != server.name:
            raise ApiError(
                404,
                f"The model '{req.model}' does not exist: this server serves '{server.name}'",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": server.engine.jobs.qsize()}

    @app.get("/ledger/checkpoint")
    async def checkpoint():
        """The latest signed checkpoint of the usage ledger: an owner who saves it can later
        prove that no row it covers was dropped (`flexmoe ledger verify --checkpoint`)."""
        cp = await asyncio.to_thread(server.db.latest_checkpoint)
        if cp is None:
            raise ApiError(404, "no signed checkpoint yet (is --signing-key set?)")
        return cp.as_dict()

    @app.get("/metrics")
    async def metrics():
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
        if name == PUBLIC:
            raise ApiError(400, "the public expert cannot be revoked")
        server.revoke(name)
        return {"revoked": name, "at": server.revoked[name]}

    async def serve(request: Request, req: CompletionRequest, prompt: str, chat: bool):
        started = time.perf_counter()
        deadline = request.scope.get("flexmoe.deadline", time.monotonic()) + server.limits.timeout_s
        tenant = tenant_of(request)
        if req.return_routed_experts and not server.merged:
            raise ApiError(
                400,
                "this is a dense model: it has no experts to route",
                param="return_routed_experts",
                code="unsupported_value",
            )
        job, meta, n_prompt = await server.run(req, prompt, tenant, deadline)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

        async def finish() -> dict:  # the ledger row is committed before the answer is sent
            try:
                return await asyncio.to_thread(server.finish, job, meta, tenant, n_prompt, req, rid)
            except SQLAlchemyError:  # never an answer without its ledger row
                raise ApiError(
                    503, "the usage ledger could not be written: retry later", "server_error"
                ) from None

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
                    event = await asyncio.wait_for(job.events.get(), min(deadline - now, 0.25))
                except TimeoutError:
                    continue
                if event[0] == "done" and event[1]["finish_reason"] == "timeout":
                    return ("error", "timeout")  # the engine saw the deadline first
                return event

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
                        try:
                            info = await finish()
                        except ApiError as e:
                            yield f"data: {json.dumps(error_body(e.message, e.kind))}\n\n"
                            return
                        chunk = {
                            "id": rid,
                            "object": obj + ".chunk" if chat else obj,
                            "created": created,
                            "model": server.name,
                            "choices": [
                                choice(None if chat else "", payload["finish_reason"], True)
                            ],
                            "usage": usage(n_prompt, len(job.tokens)),
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
        info = await finish()
        server.m_requests.labels(route(request), "200").inc()
        server.m_latency.observe(time.perf_counter() - started)
        body = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": server.name,
            "choices": [choice(payload["text"], payload["finish_reason"], False)],
            "usage": usage(n_prompt, len(job.tokens)),
            "flexmoe": info,
        }
        return (
            _with_routed_experts(body, job, server.experts()) if req.return_routed_experts else body
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        return await serve(request, req, req.text, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tenant_of(request)
        check_model(req)
        return await serve(request, req, _chat_prompt(server, req), chat=True)

    return _Guard(app, server)


def app_from_env():
    """One worker of `flexmoe serve --workers N` (uvicorn's app factory): its own model and
    engine, the shared state database, its share of the CPU threads. The parent process already
    refused bad options and imported the keys file."""
    import os

    import torch

    from flexmoe.serving.engine import Limits

    cfg = json.loads(os.environ["FLEXMOE_SERVE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.pop("workers")))
    limits = Limits(**cfg.pop("limits"))
    return create_app(Server(**cfg, limits=limits))


def _with_routed_experts(body: dict, job, names: list[str]) -> dict:
    """The answer plus vLLM's routing-replay fields: the choice carries `routed_experts` (one row
    per generated token) and `prompt_routed_experts` (one per prompt token), the latter also at
    the top level, where vLLM puts it and replay clients read it; `expert_names` maps ids to the
    merged model's experts. Only this request's own batch row is read (`Job.routed_experts`)."""
    prompt, generated = job.routed_experts()
    body["choices"][0] |= {"routed_experts": generated, "prompt_routed_experts": prompt}
    return body | {"prompt_routed_experts": prompt, "expert_names": names}


def _bearer(header: str) -> str | None:
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def _json(content_type: str) -> bool:
    """A JSON media type, or none given (read as JSON, as FastAPI does)."""
    return content_type in ("", "application/json") or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


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
        try:  # the database is read in a thread; if it cannot be read, nothing is served
            if path.startswith("/admin/") and not await asyncio.to_thread(keys.is_admin, key):
                return await self._reply(send, 403, "the admin key is required", "permission_error")
            if path.startswith("/v1/"):
                tenant = await asyncio.to_thread(keys.tenant, key)
                if tenant is None:
                    return await self._reply(
                        send,
                        401,
                        "missing or unknown API key",
                        "authentication_error",
                        "invalid_api_key",
                    )
                scope["flexmoe.tenant"] = tenant
        except Exception:
            return await self._reply(
                send, 503, "the state database is unavailable: retry later", "server_error"
            )
        kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if scope.get("method") == "POST" and path in JSON_ROUTES and not _json(kind):
            return await self._reply(
                send, 415, f"Content-Type must be application/json, not '{kind}'"
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

    async def _reply(
        self, send, status: int, message: str, kind="invalid_request_error", code=None
    ):
        self.server.m_requests.labels("guard", str(status)).inc()
        data = json.dumps(error_body(message, kind, code=code)).encode()
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
