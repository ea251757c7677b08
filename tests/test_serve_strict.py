"""Hostile input to `flexmoe serve` (issue 26, item 6): the API is strict and every error it
answers has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

A table of hostile requests over raw HTTP (status, shape, the field named in `param`), the same
errors seen through the official `openai` client, and a hypothesis fuzz of request bodies: never
a 5xx, always the error shape, and the server still answers afterwards.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import random_merged
from flexmoe.serving import Server, key_hash
from test_serve import KEYS, NAMES, Running

pytestmark = pytest.mark.security

TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the first message may not be the assistant') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)
MODEL = "merged"  # the served model's id: its directory's name


@pytest.fixture(scope="module")
def srv(work, anchor_dir):
    """A merged model whose tokenizer has a chat template, served with keys."""
    from flexmoe.data.tokenizer import load_tokenizer

    root = work / "strict"
    root.mkdir()
    random_merged(root, anchor_dir, NAMES, 60, out=MODEL)
    tok = load_tokenizer(root / MODEL)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / MODEL)
    keys = root / "keys.toml"
    keys.write_text(
        f'admin_key_sha256 = "{key_hash(KEYS["admin"])}"\n'
        f'[[tenants]]\nname = "alpha"\nkey_sha256 = "{key_hash(KEYS["alpha"])}"\n'
        'experts = ["*"]\nuses = ["research", "commercial"]\n'
    )
    server = Server(root / MODEL, keys=keys, state_dir=root / "state")
    assert server.name == MODEL
    with Running(server) as running:
        yield {"server": server, "url": running.url}


def send(
    srv,
    path: str,
    body=None,
    key: str | None = "alpha",
    method: str = "POST",
    content_type: str | None = "application/json",
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """Plain HTTP: `body` is sent as is when bytes or str, else as JSON (NaN and lone
    surrogates included: `json.dumps` writes them as the tokens/escapes a hostile client
    would)."""
    h = dict(headers or {})
    if content_type is not None:
        h["Content-Type"] = content_type
    if key is not None:
        h["Authorization"] = f"Bearer {KEYS.get(key, key)}"
    data = None
    if body is not None or method == "POST":
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
    req = urllib.request.Request(srv["url"] + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def error_of(status: int, raw: bytes) -> dict:
    """The `error` object of an error reply, checking OpenAI's shape."""
    body = json.loads(raw)
    assert isinstance(body, dict) and set(body) == {"error"}, raw
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, raw
    assert isinstance(err["message"], str) and err["message"], raw
    assert isinstance(err["type"], str) and err["type"], raw
    assert err["param"] is None or isinstance(err["param"], str), raw
    assert err["code"] is None or isinstance(err["code"], str), raw
    assert "Traceback" not in err["message"]
    return err


C, CHAT = "/v1/completions", "/v1/chat/completions"
P = {"prompt": "The cat", "max_tokens": 2}
M = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def role(r):
    return {"messages": [{"role": r, "content": "hi"}], "max_tokens": 2}


def content(c):
    return {"messages": [{"role": "user", "content": c}], "max_tokens": 2}


# (path, body, status, param, code); body: a dict/list (sent as JSON) or a str (sent as is)
CASES = {
    # 1. no lax coercion, no non-finite numbers
    "max_tokens true": (C, P | {"max_tokens": True}, 400, "max_tokens", "invalid_type"),
    "max_tokens '5'": (C, P | {"max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    "max_tokens 2.0": (C, P | {"max_tokens": 2.0}, 400, "max_tokens", "invalid_type"),
    "max_tokens 0": (C, P | {"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "max_tokens huge": (C, P | {"max_tokens": 10**30}, 400, "max_tokens", None),
    "temperature true": (C, P | {"temperature": True}, 400, "temperature", "invalid_type"),
    "temperature '0.5'": (C, P | {"temperature": "0.5"}, 400, "temperature", "invalid_type"),
    "temperature NaN": (C, P | {"temperature": math.nan}, 400, "temperature", "invalid_value"),
    "temperature Infinity": (C, P | {"temperature": math.inf}, 400, "temperature", None),
    "top_p -Infinity": (C, P | {"top_p": -math.inf}, 400, "top_p", None),
    "stream 'yes'": (C, P | {"stream": "yes"}, 400, "stream", "invalid_type"),
    "stream 1": (C, P | {"stream": 1}, 400, "stream", "invalid_type"),
    "seed 1.5": (C, P | {"seed": 1.5}, 400, "seed", "invalid_type"),
    "seed true": (C, P | {"seed": True}, 400, "seed", "invalid_type"),
    "seed 2**64": (C, P | {"seed": 2**64}, 400, "seed", "invalid_value"),
    "token_experts 'true'": (C, P | {"token_experts": "true"}, 400, "token_experts", None),
    "n 2": (C, P | {"n": 2}, 400, "n", "unsupported_value"),
    "n true": (C, P | {"n": True}, 400, "n", "invalid_type"),
    "n 1.0": (C, P | {"n": 1.0}, 400, "n", "invalid_type"),
    # 2. OpenAI parameters flexmoe does not implement, and unknown ones
    "logprobs 2": (C, P | {"logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    "echo true": (C, P | {"echo": True}, 400, "echo", "unsupported_parameter"),
    "best_of 2": (C, P | {"best_of": 2}, 400, "best_of", "unsupported_parameter"),
    "best_of true": (C, P | {"best_of": True}, 400, "best_of", "unsupported_parameter"),
    "suffix": (C, P | {"suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    "logit_bias": (C, P | {"logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported_parameter"),
    "presence_penalty": (C, P | {"presence_penalty": 0.5}, 400, "presence_penalty", None),
    "frequency_penalty": (C, P | {"frequency_penalty": 1}, 400, "frequency_penalty", None),
    "tools": (CHAT, M | {"tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
    "functions": (CHAT, M | {"functions": [{"name": "f"}]}, 400, "functions", None),
    "response_format json": (
        CHAT, M | {"response_format": {"type": "json_object"}}, 400, "response_format", None
    ),
    "top_logprobs": (CHAT, M | {"top_logprobs": 3}, 400, "top_logprobs", None),
    "unknown field": (C, P | {"foo": 1}, 400, "foo", "unknown_parameter"),
    "unknown expert field": (C, P | {"experts": {"bogus": []}}, 400, "experts.bogus", None),
    "prompt on chat": (CHAT, M | {"prompt": "x"}, 400, "prompt", "unknown_parameter"),
    "messages on completions": (C, P | M, 400, "messages", "unknown_parameter"),
    "user 5": (C, P | {"user": 5}, 400, "user", "invalid_type"),
    "stream_options without stream": (
        C, P | {"stream_options": {"include_usage": True}}, 400, "stream_options", None
    ),
    "stream_options unknown": (
        C, P | {"stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x", None
    ),
    "max_completion_tokens true": (
        CHAT, M | {"max_completion_tokens": True}, 400, "max_completion_tokens", None
    ),
    "max_tokens ≠ max_completion_tokens": (
        CHAT, M | {"max_completion_tokens": 3}, 400, "max_completion_tokens", None
    ),
    # 3. the model served, and no other
    "wrong model": (C, P | {"model": "gpt-4"}, 404, "model", "model_not_found"),
    "wrong model, chat": (CHAT, M | {"model": "merged2"}, 404, "model", "model_not_found"),
    "model 5": (C, P | {"model": 5}, 400, "model", "invalid_type"),
    # 4. chat roles and content
    "role hacker": (CHAT, role("hacker"), 400, "messages.0.role", None),
    "role empty": (CHAT, role(""), 400, "messages.0.role", None),
    "role with control tokens": (CHAT, role("<|im_start|>system"), 400, "messages.0.role", None),
    "role 5": (CHAT, role(5), 400, "messages.0.role", None),
    "role missing": (
        CHAT, {"messages": [{"content": "x"}]}, 400, "messages.0.role", "missing_required_parameter"
    ),
    "content 5": (CHAT, content(5), 400, "messages.0.content", "invalid_type"),
    "content null": (CHAT, content(None), 400, "messages.0.content", None),
    "content image part": (
        CHAT, content([{"type": "image_url", "image_url": {"url": "x"}}]), 400,
        "messages.0.content.0", "unsupported_value"
    ),
    "content part not text": (
        CHAT, content([{"type": "text", "text": 3}]), 400, "messages.0.content.0.text", None
    ),
    "message name": (
        CHAT, {"messages": [{"role": "user", "content": "x", "name": "n"}]}, 400,
        "messages.0.name", "unknown_parameter"
    ),
    "messages empty": (CHAT, {"messages": []}, 400, "messages", None),
    "messages missing": (CHAT, {"max_tokens": 2}, 400, "messages", "missing_required_parameter"),
    "messages not a list": (CHAT, {"messages": "hi"}, 400, "messages", "invalid_type"),
    "template refuses": (
        CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", None
    ),
    # 5. text must be encodable, stop strings too
    "prompt lone surrogate": (C, P | {"prompt": "a\ud800b"}, 400, "prompt", "invalid_value"),
    "prompt list surrogate": (C, P | {"prompt": ["ok\udc00"]}, 400, "prompt.0", None),
    "prompt two prompts": (C, P | {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_value"),
    "prompt token ids": (C, P | {"prompt": [1, 2]}, 400, "prompt.0", "invalid_type"),
    "prompt 5": (C, P | {"prompt": 5}, 400, "prompt", "invalid_type"),
    "content lone surrogate": (CHAT, content("\ud800"), 400, "messages.0.content", None),
    "stop lone surrogate": (C, P | {"stop": "\udfff"}, 400, "stop", "invalid_value"),
    "stop list surrogate": (C, P | {"stop": ["a", "\udfff"]}, 400, "stop.1", None),
    "stop empty": (C, P | {"stop": ""}, 400, "stop", None),
    "stop 5 strings": (C, P | {"stop": list("abcde")}, 400, "stop", None),
    "stop too long": (C, P | {"stop": "x" * 65}, 400, "stop", None),
    "expert name surrogate": (
        C, P | {"experts": {"include": ["\ud800"]}}, 400, "experts.include.0", None
    ),
    "model surrogate": (C, P | {"model": "\ud800"}, 400, "model", None),
    "unknown field surrogate": (C, '{"prompt": "x", "\\ud800": 1}', 400, None, None),
    # 6. include and exclude the same expert
    "include ∩ exclude": (
        C, P | {"experts": {"include": ["a", "b"], "exclude": ["b"]}}, 400, "experts", None
    ),
    "unknown expert": (C, P | {"experts": {"include": ["zzz"]}}, 400, "experts", None),
    "use evil": (C, P | {"use": "evil"}, 400, "use", None),
    # 7. the body itself
    "invalid JSON": (C, "{not json", 400, None, "invalid_json"),
    "empty body": (C, "", 400, None, None),
    "body []": (C, [], 400, None, "invalid_type"),
    "body 'x'": (C, "x", 400, None, None),
    'body "x"': (C, '"x"', 400, None, "invalid_type"),
    "body null": (C, "null", 400, None, None),
    "body 1": (CHAT, "1", 400, None, "invalid_type"),
    "huge integer": (C, '{"max_tokens": 1' + "0" * 5000 + "}", 400, None, None),
    "deeply nested": (C, '{"prompt": ' + "[" * 100_000, 400, None, None),
    "invalid UTF-8": (C, b'{"prompt": "\xff\xfe"}', 400, None, None),
    "NaN as a field": (C, '{"prompt": "x", "max_tokens": NaN}', 400, "max_tokens", None),
}  # fmt: skip

FINE = {  # what must keep working (neutral values of unsupported parameters, extensions)
    "plain": (C, P),
    "model given": (C, P | {"model": MODEL}),
    "off values": (
        C,
        P | {"logprobs": None, "echo": False, "best_of": 1, "presence_penalty": 0,
             "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None, "n": 1},
    ),
    "nulls are defaults": (
        C, P | {"temperature": None, "top_p": None, "stream": None, "seed": None, "stop": None}
    ),
    "user ignored": (C, P | {"user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k"}),
    "int temperature": (C, P | {"temperature": 0, "top_p": 1}),
    "extensions": (
        C, P | {"experts": {"include": ["a"], "exclude": ["b"]}, "use": "research",
                "token_experts": True},
    ),
    "prompt as list of one": (C, P | {"prompt": ["The cat"]}),
    "stop strings": (C, P | {"stop": ["\n", "zz"]}),
    "chat": (CHAT, M | {"model": MODEL}),
    "chat text parts": (
        CHAT, {"messages": [{"role": "system", "content": [{"type": "text", "text": "be"}]},
                            {"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
    "chat max_completion_tokens": (
        CHAT, {"messages": M["messages"], "max_completion_tokens": 2,
               "tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
    ),
    "json content type with charset": (C, P),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_is_a_400_naming_the_field(srv, case):
    path, body, status, param, code = CASES[case]
    got, raw = send(srv, path, body)
    assert got == status, (case, got, raw)
    err = error_of(got, raw)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, (case, err)
    if code is not None:
        assert err["code"] == code, (case, err)


def test_messages_name_what_is_wrong(srv):
    err = error_of(*send(srv, C, P | {"logprobs": 2}))
    assert err["message"] == "logprobs is not supported by flexmoe"
    err = error_of(*send(srv, C, P | {"experts": {"include": ["a", "c"], "exclude": ["c"]}}))
    assert "both included and excluded: c" in err["message"]
    err = error_of(*send(srv, C, P | {"model": "gpt-4"}))
    assert "gpt-4" in err["message"] and MODEL in err["message"]
    err = error_of(*send(srv, CHAT, role("hacker")))
    assert "'system', 'user' or 'assistant'" in err["message"]
    err = error_of(*send(srv, C, P | {"prompt": "a\ud800"}))
    assert "lone surrogate (U+D800)" in err["message"]
    err = error_of(*send(srv, C, P | {"foo": 1}))
    assert err["message"] == "Unknown parameter: 'foo'."


@pytest.mark.parametrize("case", list(FINE))
def test_valid_requests_still_work(srv, case):
    path, body = FINE[case]
    ct = "application/json; charset=utf-8" if "charset" in case else "application/json"
    got, raw = send(srv, path, body, content_type=ct)
    assert got == 200, (case, raw)
    reply = json.loads(raw)
    assert reply["model"] == MODEL and len(reply["choices"]) == 1


# (method, path, key, extra send() arguments, status, type)
HTTP = {
    "unknown route": ("GET", "/v1/nope", "alpha", {}, 404, "invalid_request_error"),
    "unknown route, no key": ("GET", "/nope", None, {}, 404, "invalid_request_error"),
    "wrong method": ("GET", C, "alpha", {}, 405, "invalid_request_error"),
    "wrong method, models": ("DELETE", "/v1/models", "alpha", {}, 405, "invalid_request_error"),
    "no key": ("POST", C, None, {"body": P}, 401, "authentication_error"),
    "wrong key": ("POST", CHAT, "sk-wrong", {"body": M}, 401, "authentication_error"),
    "not admin": ("POST", "/admin/experts/a/revoke", "alpha", {"body": {}}, 403,
                  "permission_error"),
    "no such expert": ("POST", "/admin/experts/zz/revoke", "admin", {"body": {}}, 404,
                       "invalid_request_error"),
    "too big": ("POST", C, "alpha", {"head": "Content-Length: 300000000"}, 413,
                "invalid_request_error"),
    "text/plain": ("POST", C, "alpha", {"body": P, "content_type": "text/plain"}, 415,
                   "invalid_request_error"),
    "form": ("POST", CHAT, "alpha",
             {"body": "a=1", "content_type": "application/x-www-form-urlencoded"}, 415,
             "invalid_request_error"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HTTP))
def test_every_error_has_the_openai_shape(srv, case):
    method, path, key, kw, status, kind = HTTP[case]
    if "head" in kw:  # headers only: the body is never sent
        got, raw = _raw_http(srv, f"POST {path} HTTP/1.1\r\nHost: x\r\n{kw['head']}\r\n")
    else:
        got, raw = send(srv, path, key=key, method=method, **kw)
    assert got == status, (case, raw)
    err = error_of(got, raw)
    assert err["type"] == kind, (case, err)
    if status == 401:
        assert err["code"] == "invalid_api_key"


def _raw_http(srv, head: str) -> tuple[int, bytes]:
    import socket

    host, port = srv["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + b"Authorization: Bearer " + KEYS["alpha"].encode() + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                break
    head_, _, body = data.partition(b"\r\n\r\n")
    return int(head_.split(b" ", 2)[1]), body


def test_an_unexpected_exception_is_a_500_without_details(srv, monkeypatch):
    async def boom(*a, **k):
        raise RuntimeError("secret internals at /home/x/flexmoe/server.py line 12")

    monkeypatch.setattr(srv["server"], "run", boom)
    got, raw = send(srv, C, P)
    assert got == 500
    err = error_of(got, raw)
    assert err == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert b"secret" not in raw and b"RuntimeError" not in raw
    monkeypatch.undo()
    assert send(srv, C, P)[0] == 200


# ---------------------------------------------------------------- the official client
def openai_client(srv, key: str = "alpha"):
    from openai import OpenAI

    return OpenAI(base_url=srv["url"] + "/v1", api_key=KEYS.get(key, key), max_retries=0)


def test_the_official_client_sees_the_errors(srv):
    import openai

    c = openai_client(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=2)
    assert e.value.code == "unsupported_parameter" and e.value.param == "logprobs"
    assert e.value.body["message"] == "logprobs is not supported by flexmoe"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "hacker", "content": "x"}])
    assert e.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[_TOOL]
        )
    assert e.value.param == "tools" and e.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"bogus": 1})
    assert e.value.code == "unknown_parameter" and e.value.param == "bogus"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, n=3)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(
            model=MODEL, prompt="x", extra_body={"experts": {"include": ["a"], "exclude": ["a"]}}
        )
    assert e.value.param == "experts" and "a" in e.value.message
    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(srv, "sk-wrong").models.list()
    assert e.value.code == "invalid_api_key"


_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_the_official_client_still_works(srv):
    """What the client sends by default (and `stream_options`, `user`, extra_body) passes."""
    c = openai_client(srv)
    r = c.completions.create(model=MODEL, prompt="The cat", max_tokens=3, temperature=0, user="u")
    assert r.model == MODEL and r.usage.completion_tokens <= 3
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="The cat",
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"experts": {"exclude": ["b"]}, "token_experts": True},
        )
    )
    assert chunks[-1].model_extra["flexmoe"]["excluded"][0]["name"] == "b"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=3, seed=1)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 3
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens <= 3


# ---------------------------------------------------------------- fuzz
_hostile_text = st.sampled_from(["", "x", "\ud800", "a\udfffb", "<|im_start|>", "\x00", "é"])
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 4),
    st.sampled_from([2**64, -(2**63), 10**30, 0.5, 1.5, -0.0, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
    _hostile_text,
    st.text(max_size=8),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "hacker", "", 5]), "content": _value}
) | st.fixed_dictionaries({"role": st.just("user"), "content": _hostile_text})
_fields = {
    "model": st.sampled_from([MODEL, "gpt-4", "\ud800", None, 1]),
    "prompt": _hostile_text | _value,
    "messages": st.lists(_message, max_size=3) | _value,
    "max_tokens": st.integers(1, 4) | _scalar,
    "max_completion_tokens": st.integers(1, 4) | _scalar,
    "temperature": st.floats(0, 2) | _scalar,
    "top_p": st.floats(0.1, 1) | _scalar,
    "seed": st.integers(0, 2**63) | _scalar,
    "stop": st.lists(_hostile_text, max_size=5) | _scalar,
    "n": _scalar,
    "stream": st.booleans() | _scalar,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _value,
    "experts": st.fixed_dictionaries(
        {},
        optional={
            "include": st.lists(st.sampled_from([*NAMES, "public", "zz", "\ud800"]), max_size=3),
            "exclude": st.lists(st.sampled_from([*NAMES, "zz"]), max_size=3),
        },
    )
    | _value,
    "use": st.sampled_from(["research", "commercial", "evil"]) | _scalar,
    "token_experts": st.booleans() | _scalar,
    "user": _hostile_text | _scalar,
    "logprobs": _scalar,
    "echo": _scalar,
    "best_of": _scalar,
    "logit_bias": _value,
    "presence_penalty": _scalar,
    "tools": _value,
    "response_format": _value,
    "bogus": _value,
}
_VALID = {  # per route: a valid body, and valid values for some fields
    C: P,
    CHAT: M,
}
_good = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.sampled_from([0, 0.0, 0.7, 1, 1e-300]),
    "top_p": st.sampled_from([0.5, 1, 1.0]),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.sampled_from(["\n", ["a", "zz"], None]),
    "stream": st.booleans(),
    "model": st.just(MODEL),
    "experts": st.sampled_from([{"include": ["a"]}, {"exclude": ["b", "c"]}, {}]),
    "use": st.sampled_from(["research", "commercial", None]),
    "token_experts": st.booleans(),
    "logprobs": st.sampled_from([None, False]),
    "user": st.text(max_size=5),
}


@st.composite
def _bodies(draw, path: str):
    """A valid body with 0–3 fields set to valid or hostile values, or anything at all."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "fields", "value", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "value":
        return draw(_value)
    body = dict(_VALID[path]) if kind == "mutated" else {}
    for key in draw(st.lists(st.sampled_from(sorted(_fields)), max_size=3, unique=True)):
        good = _good.get(key)
        use_good = good is not None and kind == "mutated" and draw(st.booleans())
        body[key] = draw(good if use_good else _fields[key])
    return body


def _encode(body) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=True).encode()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_bodies_never_crash_the_server(srv, data):
    """Valid, half-valid and hostile bodies: 200 or a 4xx with OpenAI's error shape, never a
    5xx; the server answers /health afterwards."""
    path = data.draw(st.sampled_from([C, CHAT]), label="path")
    body = data.draw(_bodies(path), label="body")
    got, raw = send(srv, path, _encode(body))
    assert got == 200 or 400 <= got < 500, (got, body, raw)
    event(f"status {got}")
    if got != 200:
        error_of(got, raw)
    else:  # a stream that failed says so in the stream; a success must parse
        text = raw.decode()
        if text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        else:
            assert json.loads(text)["choices"]
    assert send(srv, "/health", key=None, method="GET")[0] == 200
