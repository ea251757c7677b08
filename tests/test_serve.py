"""`flexmoe serve`: a real uvicorn server on a free localhost port, driven with the official
`openai` client (completions, streaming, chat, extra_body experts) and raw HTTP for errors."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import random_merged, run_cli
from flexmoe.serving import Limits, Server, create_app, key_hash, summarize_ledger

KEYS = {"alpha": "sk-alpha-123", "beta": "sk-beta-456", "admin": "sk-admin-789"}
NAMES = ["a", "b", "c"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread, stopped on exit."""

    def __init__(self, server: Server):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            create_app(server), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.uv = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        t0 = time.time()
        while not self.uv.started:
            assert time.time() - t0 < 30, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def env(work, anchor_dir) -> dict:
    root = work / "serve"
    root.mkdir()
    random_merged(root, anchor_dir, NAMES, 20)
    keys = root / "keys.toml"
    keys.write_text(
        f'admin_key_sha256 = "{key_hash(KEYS["admin"])}"\n'
        f'[[tenants]]\nname = "alpha"\nkey_sha256 = "{key_hash(KEYS["alpha"])}"\n'
        'experts = ["*"]\nuses = ["research", "commercial"]\n'
        f'[[tenants]]\nname = "beta"\nkey_sha256 = "{key_hash(KEYS["beta"])}"\n'
        'experts = ["a"]\nuses = ["research"]\n'
    )
    server = Server(root / "merged", keys=keys, state_dir=root / "state")
    with Running(server) as running:
        yield {"root": root, "server": server, "url": running.url, "keys": keys}


def client(env, who: str = "alpha"):
    from openai import OpenAI

    return OpenAI(base_url=env["url"] + "/v1", api_key=KEYS[who], max_retries=0)


def alone(env, prompt: str, max_tokens: int, include=None, exclude=None):
    """The same request with the library's `generate` (what the CLI runs)."""
    from flexmoe.inference.generate import generate

    s = env["server"]
    return generate(s.model, s.tok, prompt, max_tokens, include=include, exclude=exclude)


def test_completion_with_extra_body_experts(env):
    r = client(env).completions.create(
        model="merged",
        prompt="The cat",
        max_tokens=8,
        temperature=0,
        extra_body={"experts": {"include": ["a", "c"]}},
    )
    ref = alone(env, "The cat", 8, include=["a", "c"])
    assert r.choices[0].text == ref.text
    fm = r.model_extra["flexmoe"]
    assert fm["active"] == ["public", "a", "c"] and fm["attribution"]["b"] == 0.0
    assert abs(sum(fm["attribution"].values()) - 1) < 1e-9
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_streaming_matches_and_ends_with_attribution(env):
    kw = dict(model="merged", prompt="def f(x):", max_tokens=10, temperature=0)
    whole = client(env).completions.create(**kw, extra_body={"experts": {"exclude": ["b"]}})
    chunks = list(
        client(env).completions.create(
            **kw, stream=True, extra_body={"experts": {"exclude": ["b"]}}
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    last = chunks[-1].model_extra["flexmoe"]
    assert last["attribution"] == whole.model_extra["flexmoe"]["attribution"]
    assert last["excluded"] == [{"name": "b", "reason": "excluded by request"}]


def test_chat_needs_a_template(env):
    import openai

    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(env).chat.completions.create(
            model="merged", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )


def test_chat_with_a_template(env, work):
    from flexmoe.data.tokenizer import load_tokenizer

    chat_dir = env["root"] / "merged-chat"
    if not chat_dir.exists():
        import shutil

        shutil.copytree(env["root"] / "merged", chat_dir)
        tok = load_tokenizer(chat_dir)
        tok.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
        )
        tok.save_pretrained(chat_dir)
    server = Server(chat_dir, keys=env["keys"], state_dir=env["root"] / "state-chat")
    with Running(server) as running:
        from openai import OpenAI

        c = OpenAI(base_url=running.url + "/v1", api_key=KEYS["alpha"], max_retries=0)
        r = c.chat.completions.create(
            model="merged-chat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            temperature=0,
        )
        ref = alone({"server": server}, "user: hi\nassistant:", 6)
        assert r.choices[0].message.content == ref.text
        assert r.model_extra["flexmoe"]["active"] == ["public", *NAMES]


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


def raw(env, path: str, body=None, key: str | None = "alpha", method: str = "POST") -> Reply:
    """Plain HTTP (stdlib urllib), for what the official client hides: status codes, bad JSON."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {KEYS.get(key, key)}"
    data = None
    if method == "POST":
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(env["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return Reply(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read())


@pytest.mark.parametrize(
    "body, key, status, expect",
    [
        ("{not json", "alpha", 400, ""),
        ({"prompt": "x", "experts": {"include": ["zzz"]}}, "alpha", 400, "unknown expert"),
        ({"prompt": "x", "experts": {"include": ["b"]}}, "beta", 403, "expert 'b'"),
        ({"prompt": "x", "use": "commercial"}, "beta", 403, "commercial"),
        ({"prompt": "x"}, None, 401, "API key"),
        ({"prompt": "x"}, "sk-wrong", 401, "API key"),
        ({"prompt": "x", "max_tokens": 100000}, "alpha", 400, "max_tokens"),
        ({"prompt": "word " * 3000}, "alpha", 400, "prompt has"),
        ({"prompt": "x", "n": 2}, "alpha", 400, "n"),
        ({"prompt": "x", "temperature": -1}, "alpha", 400, "temperature"),
        ({"prompt": "x", "seed": 2**64}, "alpha", 400, "seed"),
    ],
)
def test_errors_are_json_with_status(env, body, key, status, expect):
    r = raw(env, "/v1/completions", body, key)
    assert r.status_code == status, r.text
    assert expect in r.json()["error"]["message"]


def test_tenant_sees_only_its_experts(env):
    r = client(env, "beta").completions.create(
        model="merged", prompt="The", max_tokens=4, temperature=0
    )
    fm = r.model_extra["flexmoe"]
    assert fm["active"] == ["public", "a"]
    assert {e["name"] for e in fm["excluded"]} == {"b", "c"}
    assert fm["attribution"]["b"] == fm["attribution"]["c"] == 0.0
    listed = raw(env, "/v1/experts", key="beta", method="GET").json()["data"]
    assert [e["name"] for e in listed if e["active"]] == ["public", "a"]


def test_full_queue_is_503_and_a_stuck_request_504(env):
    server = Server(
        env["root"] / "merged",
        keys=env["keys"],
        state_dir=env["root"] / "state-busy",
        limits=Limits(queue_size=1, timeout_s=2),
    )
    server.engine.stopping = True  # the engine never drains the queue
    with Running(server) as running:
        e = {"url": running.url}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(raw, e, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            time.sleep(0.5)
            second = raw(e, "/v1/completions", {"prompt": "y", "max_tokens": 2})
            assert (
                second.status_code == 503 and "queue is full" in second.json()["error"]["message"]
            )
            assert first.result().status_code == 504


def test_revoke_is_immediate_and_persisted(env):
    state = env["root"] / "state-revoke"
    server = Server(env["root"] / "merged", keys=env["keys"], state_dir=state)
    with Running(server) as running:
        e = {"url": running.url}
        assert raw(e, "/admin/experts/c/revoke", {}, "alpha").status_code == 403
        ok = raw(
            e, "/v1/completions", {"prompt": "x", "max_tokens": 2, "experts": {"include": ["c"]}}
        )
        assert ok.status_code == 200
        assert raw(e, "/admin/experts/c/revoke", {}, "admin").status_code == 200
        r = raw(
            e, "/v1/completions", {"prompt": "x", "max_tokens": 2, "experts": {"include": ["c"]}}
        )
        assert r.status_code == 403 and "revoked" in r.json()["error"]["message"]
        r = raw(e, "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert r.json()["flexmoe"]["attribution"]["c"] == 0.0
    again = Server(env["root"] / "merged", keys=env["keys"], state_dir=state)  # a restart
    assert "c" in again.revoked


def test_exact_under_load(env):
    """32 concurrent clients with random expert subsets (greedy): each response equals the same
    request served alone by `generate`; no server errors; requests were batched."""
    rng = random.Random(0)
    prompts = ["The cat", "def f(x):", "Court rules", "3 + 4 =", "The sky of"]
    reqs = []
    for i in range(32):
        sub = [n for n in NAMES if rng.random() < 0.5]
        reqs.append((prompts[i % len(prompts)], 4 + i % 5, sub or None))
    before = env["server"].engine.batches

    def one(req):
        prompt, n, sub = req
        r = client(env).completions.create(
            model="merged",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            extra_body={"experts": {"include": sub}} if sub else None,
        )
        return r.choices[0].text, r.model_extra["flexmoe"]["active"]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, reqs))
    for (prompt, n, sub), (text, active) in zip(reqs, got, strict=True):
        ref = alone(env, prompt, n, include=sub)
        assert text == ref.text, (prompt, sub)
        assert active == ref.active
    assert env["server"].engine.batches - before < 32  # dynamic batching grouped requests


def test_metrics_and_ledger(env, capsys):
    client(env).completions.create(model="merged", prompt="The", max_tokens=3, temperature=0)
    text = raw(env, "/metrics", method="GET").text
    assert "flexmoe_requests_total" in text and "flexmoe_expert_routed_tokens_total" in text
    recs = [json.loads(r[1]) for r in env["server"].db.rows()]
    fields = {"time", "request_id", "tenant", "active", "owners", "completion_tokens"}
    assert recs and fields | {"attribution", "seq"} <= set(recs[0])
    code, out, err = run_cli(["ledger", "verify", env["root"] / "state" / "flexmoe.db"], capsys)
    assert code == 0 and "alpha" in out and "intact" in out, err
    # a JSONL ledger of an older flexmoe: summarized as it is, and importable into the chain
    old = env["root"] / "old-ledger.jsonl"
    old.write_text(
        "".join(
            json.dumps(
                {k: r[k] for k in fields - {"request_id"} | {"attribution", "prompt_tokens"}}
            )
            + "\n"
            for r in recs[:2]
        )
    )
    assert summarize_ledger(old)["alpha"]["public"] > 0
    db = env["root"] / "imported.db"
    code, out, err = run_cli(["ledger", "import", old, "--db", db], capsys)
    assert code == 0 and f"{len(recs[:2])} record(s)" in out, err
    code, out, err = run_cli(["ledger", "verify", db], capsys)
    assert code == 0 and f"chain: {len(recs[:2])} rows, intact" in out, err


def test_health_models_and_page(env):
    assert raw(env, "/health", method="GET").json()["status"] == "ok"
    models = raw(env, "/v1/models", key="alpha", method="GET").json()
    assert models["data"][0]["object"] == "model"
    page = raw(env, "/", method="GET", key=None)
    assert page.status_code == 200 and "<script>" in page.text


@pytest.mark.browser
def test_web_page_in_a_real_browser(env, tmp_path):
    """Headless chromium: load the page, untick an expert, generate, check the coloured tokens
    and that the excluded expert gets 0%."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(env["root"] / "merged", state_dir=env["root"] / "state-browser")  # open
    with Running(server) as running:
        opts = webdriver.ChromeOptions()
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            opts.add_argument(a)
        service = webdriver.ChromeService(executable_path=_which("chromedriver"))
        opts.binary_location = _which("chromium")
        driver = webdriver.Chrome(options=opts, service=service)
        try:
            driver.get(running.url + "/")
            WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.ID, "expert-b"))
            driver.find_element(By.ID, "expert-b").click()
            driver.find_element(By.ID, "go").click()
            WebDriverWait(driver, 60).until(
                lambda d: d.find_element(By.ID, "out").get_attribute("data-done") == "1"
            )
            tokens = driver.find_elements(By.CSS_SELECTOR, "#out span.tok")
            assert tokens and all(t.get_attribute("data-expert") != "b" for t in tokens)
            assert all("border-bottom" in (t.get_attribute("style") or "") for t in tokens)
            share = float(driver.find_element(By.ID, "share-b").get_attribute("data-share"))
            assert share == 0.0
            driver.save_screenshot(str(tmp_path / "serve-page.png"))
            assert (tmp_path / "serve-page.png").stat().st_size > 0
        finally:
            driver.quit()


def _which(name: str) -> str:
    import shutil

    path = shutil.which(name) or shutil.which(name.replace("chromium", "chromium-browser"))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test-browser` (it installs it)")
    return str(Path(path))


def test_cli_serve_binds_localhost(env):
    """`flexmoe serve` as users run it: a subprocess on 127.0.0.1, answering /health."""
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "flexmoe.cli", "serve", "--model", str(env["root"] / "merged")]
    cmd += ["--port", str(port), "--keys", str(env["keys"]), "--device", "cpu"]
    cmd += ["--state", str(env["root"] / "state-cli")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while True:
            try:
                r = raw({"url": f"http://127.0.0.1:{port}"}, "/health", method="GET")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() - t0 < 60, "flexmoe serve did not come up"
                time.sleep(0.2)
        assert r.json()["status"] == "ok"
        with socket.socket() as s:  # not reachable on another interface address
            s.settimeout(1)
            other = socket.gethostbyname(socket.gethostname())
            if other != "127.0.0.1":
                assert s.connect_ex((other, port)) != 0
        r = raw({"url": f"http://127.0.0.1:{port}"}, "/v1/models", key="sk-nope", method="GET")
        assert r.status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)


def test_hostile_requests_do_not_hurt_others(env):
    """A tiny temperature or odd route names cannot fail other requests or grow the metrics."""
    r = raw(env, "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 1e-300})
    assert r.status_code == 200, r.text
    for i in range(5):
        assert raw(env, f"/admin/experts/zz-{i}/revoke", {}, "alpha").status_code == 403
    assert "zz-" not in raw(env, "/metrics", method="GET").text
    r = raw(env, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None)
    assert r.status_code == 401
