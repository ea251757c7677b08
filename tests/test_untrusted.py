"""Untrusted input and safe outputs (issue 15): every case here was a defect on main before the
fix. Hostile packages, manifests, merged directories and CLI arguments must give one line and
exit 2, write nothing and destroy nothing; outputs appear complete or not at all."""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_package, run_cli
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.merge import merge, probe
from flexmoe.store.anchor_dir import RECORD, ROUTER, load_anchor
from flexmoe.store.merged import MERGED, experts_of
from flexmoe.store.package import MANIFEST, WEIGHTS, tensor_sha256

TODAY = dt.date.today()


def one_line_error(code: int, err: str, expect: str | None = None) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    if expect is not None:
        assert expect in lines[0], lines[0]
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def rewrite(pkg: Path, tensors: dict | None = None, **fields) -> None:
    """Change a package's tensors and/or manifest fields, keeping its hashes consistent."""
    m = json.loads((pkg / MANIFEST).read_text())
    if tensors is not None:
        save_file(tensors, pkg / WEIGHTS)
        m["tensors"] = {
            k: {"shape": list(v.shape), "dtype": "float32", "sha256": tensor_sha256(v)}
            for k, v in tensors.items()
        }
    m.update(fields)
    (pkg / MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def env(work, anchor_dir) -> dict:
    root = work / "untrusted"
    root.mkdir()
    pkgs = [random_package(root / f"pkg-{n}", anchor_dir, n, seed=i) for i, n in enumerate("ab")]
    merge(anchor_dir, pkgs, root / "merged", log=None)
    return {"root": root, "anchor": anchor_dir, "pkgs": pkgs, "merged": root / "merged"}


def copy_pkg(env, name: str, src: int = 0) -> Path:
    dst = env["root"] / name
    shutil.copytree(env["pkgs"][src], dst)
    return dst


# ---------------------------------------------------------------- 1. writers destroy outputs
def test_merge_refuses_to_write_over_its_own_anchor(env, capsys):
    before = snapshot(env["anchor"])
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][0], "-o", env["anchor"]],
        capsys,
    )
    one_line_error(code, err, "overlaps the input")
    assert snapshot(env["anchor"]) == before


def test_merge_output_inside_or_around_an_input_is_refused(env, capsys):
    for out in (env["pkgs"][0] / "sub", env["root"], Path(".")):
        code, _, err = run_cli(
            ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][0], "-o", out], capsys
        )
        one_line_error(code, err)


def test_writers_refuse_a_users_nonempty_directory(env, shards, tok_dir, capsys):
    user = env["root"] / "my-folder"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    cases = [
        ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][0], "-o", user],
        ["expert", "train", "--anchor", env["anchor"], "--data", shards["code/train"]]
        + ["--name", "x", "--recipe", "paper", "-o", user],
        ["anchor", "train", "--data", shards["public/train"], "--tokenizer", tok_dir]
        + ["--preset", "tiny", "-o", user],
        ["data", "train-tokenizer", "--out", user],
    ]
    for args in cases:
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, "--overwrite")
        assert (user / "thesis.txt").read_text() == "years of work"
    # a previous output of the same command is replaced; anything else only with --overwrite
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][0], "-o", user]
        + ["--overwrite"],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][1], "-o", user], capsys
    )
    assert code == 0, err
    assert json.loads((user / MERGED).read_text())["experts"] == ["public", "b"]


# ---------------------------------------------------------------- 2. dense models run as dense
def test_generate_on_a_dense_anchor_runs_the_dense_model(env, capsys):
    from transformers import AutoModelForCausalLM

    from flexmoe.data.tokenizer import load_tokenizer

    code, out, err = run_cli(
        ["generate", "--model", env["anchor"], "--prompt", "The", "--max-new-tokens", "8"], capsys
    )
    assert code == 0, err
    tok = load_tokenizer(env["anchor"])
    dense = AutoModelForCausalLM.from_pretrained(env["anchor"]).eval()
    ids = tok("The", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ref = dense.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
    )
    expected = "The" + tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.split() == expected.split()
    code, _, err = run_cli(
        ["generate", "--model", env["anchor"], "--prompt", "x", "--exclude", "a"], capsys
    )
    one_line_error(code, err, "dense model has no experts")


def test_a_model_that_is_neither_dense_nor_merged_is_refused(env, capsys):
    odd = env["root"] / "odd"
    shutil.copytree(env["anchor"], odd)
    cfg = json.loads((odd / "config.json").read_text()) | {"model_type": "gpt2"}
    (odd / "config.json").write_text(json.dumps(cfg))
    for args in (["generate", "--prompt", "x"], ["eval", "bpb", "--data", env["root"]]):
        code, _, err = run_cli([*args, "--model", odd], capsys)
        one_line_error(code, err, "neither a flexmoe merged model")
    # OLMo-2 weights labelled as another supported family: its extra weights would be ignored
    cfg["model_type"] = "llama"
    (odd / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["generate", "--prompt", "x", "--model", odd], capsys)
    one_line_error(code, err, "dense llama model (weight ")
    # a dense checkpoint missing weights would load partly random: refused
    part = env["root"] / "partial"
    shutil.copytree(env["anchor"], part)
    w = load_file(part / "model.safetensors")
    save_file({k: v for k, v in w.items() if "layers.0.mlp" not in k}, part / "model.safetensors")
    code, _, err = run_cli(["generate", "--model", part, "--prompt", "x"], capsys)
    one_line_error(code, err, "not a complete")


# ---------------------------------------------------------------- 3. resource exhaustion
def test_sparse_weight_file_is_rejected_before_allocation(env, capsys):
    pkg = copy_pkg(env, "sparse")
    with open(pkg / WEIGHTS, "r+b") as f:
        f.truncate(8 << 30)  # 8 GiB, sparse: 0 bytes on disk
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "too large")
    assert time.perf_counter() - t0 < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KiB


def test_hostile_header_claiming_huge_tensor_is_rejected(env, capsys):
    pkg = copy_pkg(env, "bigheader")
    header = json.dumps({"layers.0.gate_proj": {"dtype": "F32", "shape": [1 << 20, 1 << 12]}})
    (pkg / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header.encode())
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "has shape")


@pytest.mark.parametrize(
    "how, expect",
    [
        ("big", "too large"),
        ("owner", "field 'owner'"),
        ("deep", "nested"),
    ],
)
def test_hostile_manifest_is_bounded(env, capsys, how, expect):
    pkg = copy_pkg(env, f"manifest-{how}")
    m = json.loads((pkg / MANIFEST).read_text())
    if how == "big":
        m["training"]["hyperparameters"]["pad"] = "x" * (1 << 20)
        text = json.dumps(m)
    elif how == "owner":
        m["owner"] = "o" * 100_000
        text = json.dumps(m)
    else:
        text = json.dumps(m)[:-1] + ', "deep": ' + "[" * 50_000 + "]" * 50_000 + "}"
    (pkg / MANIFEST).write_text(text)
    t0 = time.perf_counter()
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, expect)
    assert time.perf_counter() - t0 < 10


def test_huge_merged_metadata_is_refused(env, capsys):
    bad = env["root"] / "merged-big"
    shutil.copytree(env["merged"], bad)
    meta = json.loads((bad / MERGED).read_text())
    meta["pad"] = "x" * (65 << 20)
    (bad / MERGED).write_text(json.dumps(meta))
    code, _, err = run_cli(["generate", "--model", bad, "--prompt", "x"], capsys)
    one_line_error(code, err, "too large")


# ---------------------------------------------------------------- 4. absurd weights
def test_finite_but_absurd_weight_is_rejected(env, capsys):
    pkg = copy_pkg(env, "absurd")
    t = load_file(pkg / WEIGHTS)
    t["layers.0.gate_proj"][0, 0] = 3e38
    rewrite(pkg, t)
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "over 100× the anchor's")
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", pkg, "-o", env["root"] / "m-absurd"],
        capsys,
    )
    one_line_error(code, err)
    assert not (env["root"] / "m-absurd").exists()


@pytest.mark.parametrize(
    "value, expect",
    [("long", "has norm"), ("short", "expected ["), ("wide", "expected [")],
)
def test_bad_hidden_centroid_is_rejected(env, capsys, value, expect):
    import torch

    pkg = copy_pkg(env, f"centroid-{value}")
    t = load_file(pkg / WEIGHTS)
    h = t["layers.0.router"].shape[0]
    t["hidden_centroid"] = {
        "long": torch.ones(h),  # a mean of unit vectors has norm ≤ 1
        "short": torch.zeros(h - 1),
        "wide": torch.zeros(h, 2),
    }[value]
    rewrite(pkg, t)
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, expect)


@pytest.mark.parametrize("value, expect", [("long", "has norm"), ("few", "expected [8, 384]")])
def test_bad_domain_prototypes_are_rejected(env, capsys, value, expect):
    import torch

    pkg = copy_pkg(env, f"prototypes-{value}")
    t = load_file(pkg / WEIGHTS)
    unit = torch.nn.functional.normalize(torch.randn(8, 384), dim=-1)
    t["domain_prototypes"] = {"long": unit * torch.tensor([1.0] * 7 + [1.5])[:, None]}.get(
        value, unit[:7]
    )
    rewrite(pkg, t)
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, expect)


def test_probe_refuses_a_merged_model_with_non_finite_logits(env):
    from flexmoe.store.merged import load_merged

    model = load_merged(env["merged"])
    probe(model, experts_of(model).names)  # a sound model passes
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[2].fill_(3e38)
    with pytest.raises(FlexmoeError, match="non-finite logits with expert"):
        probe(model, experts_of(model).names)


# ---------------------------------------------------------------- 5. untrusted text in the terminal
def test_untrusted_text_is_printed_literally(env, capsys):
    pkg = copy_pkg(env, "markup")
    rewrite(pkg, owner="[/] [bold red]evil\x1b[2J\x1b]0;pwned\x07 \u202e")
    code, out, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    assert code == 0, err
    assert "[/] [bold red]evil" in out and "\x1b" not in out and "\u202e" not in out
    code, _, err = run_cli(
        ["generate", "--model", env["merged"], "--prompt", "x", "--exclude", "[/]\x1b[31m"], capsys
    )
    line = one_line_error(code, err, "unknown expert(s) [/]")
    assert "\x1b" not in line
    bad = copy_pkg(env, "badname")
    rewrite(bad, name="Bad Name")
    code, _, err = run_cli(["expert", "verify", bad, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "^[a-z0-9][a-z0-9_-]{0,63}$")


# ---------------------------------------------------------------- 6. tracebacks → one line
def _corrupt(env, what: str) -> list:
    root = env["root"] / f"corrupt-{what}"
    if what in ("record", "router"):
        shutil.copytree(env["anchor"], root)
        target = root / (RECORD if what == "record" else ROUTER)
        target.write_text("{ not json" if what == "record" else "garbage")
        return ["expert", "verify", env["pkgs"][0], "--anchor", root]
    if what.startswith("meta"):
        shutil.copytree(env["merged"], root)
        meta = json.loads((root / MERGED).read_text())
        meta.update(
            {
                "meta-experts": {"experts": "public"},
                "meta-topk": {"top_k": "2"},
                "meta-manifest": {"manifests": {"a": {"name": 3}}},
                "meta-json": {},
            }[what]
        )
        (root / MERGED).write_text(json.dumps(meta) if what != "meta-json" else "{")
        return ["generate", "--model", root, "--prompt", "x"]
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what", ["record", "router", "meta-experts", "meta-topk", "meta-manifest", "meta-json"]
)
def test_corrupt_files_give_one_line(env, capsys, what):
    code, _, err = run_cli(_corrupt(env, what), capsys)
    one_line_error(code, err)


def test_corrupt_token_shard_index_gives_one_line(env, shards, capsys):
    for index in ("{", json.dumps({"dtype": "uint16", "shards": [{"file": "../../etc/passwd"}]})):
        data = env["root"] / "shards-bad"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(shards["code/heldout"], data / "code" / "heldout")
        (data / "code" / "heldout" / "index.json").write_text(index)
        code, _, err = run_cli(["eval", "bpb", "--model", env["anchor"], "--data", data], capsys)
        one_line_error(code, err, "index.json")


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-len", "1"], "--seq-len"),
    ],
)
def test_bad_training_settings_give_one_line(env, shards, capsys, flags, expect):
    code, _, err = run_cli(
        ["expert", "train", "--anchor", env["anchor"], "--data", shards["code/train"]]
        + ["--name", "x", "--recipe", "paper", "-o", env["root"] / "never", *flags],
        capsys,
    )
    one_line_error(code, err, expect)
    assert not (env["root"] / "never").exists()


@pytest.mark.parametrize(
    "flags", [["--seq-len", "0"], ["--seq-len", "10000000"], ["--max-tokens", "-5"]]
)
def test_bad_eval_settings_give_one_line(env, shards, capsys, flags):
    root = shards["code/heldout"].parent.parent
    code, _, err = run_cli(
        ["eval", "bpb", "--model", env["merged"], "--data", root, *flags], capsys
    )
    one_line_error(code, err)


def test_bad_name_is_refused_before_any_work(env, shards, capsys):
    for name in ("a\n", "public", "A"):
        t0 = time.perf_counter()
        code, _, err = run_cli(
            ["expert", "train", "--anchor", env["anchor"], "--data", shards["code/train"]]
            + ["--name", name, "--recipe", "paper", "-o", env["root"] / "never"],
            capsys,
        )
        one_line_error(code, err)
        assert time.perf_counter() - t0 < 5


def test_usage_errors_are_one_line(capsys):
    for args in (["merge", "--top-k", "x"], ["no-such-verb"], ["eval", "bpb"]):
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err)


# ---------------------------------------------------------------- 7. resume
def test_resume_after_the_final_checkpoint_writes_the_package(env, shards, capsys, monkeypatch):
    import flexmoe.lifecycle.expert as lifecycle
    from flexmoe.lifecycle.expert import train_expert

    out = env["root"] / "resumed"
    kw = dict(recipe="paper", steps=4, batch_size=2, seq_len=32, router_docs=4)
    full = train_expert(env["anchor"], shards["code/train"], out, "r", **kw)
    shutil.rmtree(out)
    assert not (out.with_name("resumed.train") / "checkpoints").exists()  # dropped once packaged

    def killed(*a, **k):  # a kill between the final checkpoint and the package write
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(lifecycle, "write_package", killed)
        with pytest.raises(KeyboardInterrupt):
            train_expert(env["anchor"], shards["code/train"], out, "r", **kw)
    assert not out.exists()
    with pytest.raises(FlexmoeError, match="different settings.*seed"):
        train_expert(env["anchor"], shards["code/train"], out, "r", resume=True, seed=1, **kw)
    with pytest.raises(FlexmoeError, match="different settings.*lr"):
        train_expert(env["anchor"], shards["code/train"], out, "r", resume=True, lr=0.3, **kw)
    again = train_expert(env["anchor"], shards["code/train"], out, "r", resume=True, **kw)
    assert again["training"]["tokens"] == full["training"]["tokens"]
    assert again["tensors"] == full["tensors"]  # same weights (sha256 of every tensor)


def test_metrics_log_has_each_step_once_after_resume(env, shards):
    from flexmoe.lifecycle.expert import train_expert

    out = env["root"] / "logged"
    kw = dict(recipe="paper", steps=6, batch_size=2, seq_len=32, router_docs=4, ckpt_every=2)
    train_expert(env["anchor"], shards["code/train"], out, "l", stop_after=5, log_every=1, **kw)
    train_expert(env["anchor"], shards["code/train"], out, "l", resume=True, log_every=1, **kw)
    log = out.with_name("logged.train") / "metrics.jsonl"
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    train_steps = [s for s in steps if s <= 6]
    assert sorted(set(train_steps)) == list(range(1, 7))
    assert len([s for s in steps if s < 6]) == 5  # no step before the last logged twice


# ---------------------------------------------------------------- 8. consent on every path
def test_expired_consent_is_enforced_by_eval_too(env, shards, capsys):
    from flexmoe.evaluation.heldout import bpb_table

    lapsed = env["root"] / "lapsed"
    shutil.copytree(env["merged"], lapsed)
    meta = json.loads((lapsed / MERGED).read_text())
    meta["manifests"]["a"]["consent"]["expires"] = (TODAY - dt.timedelta(days=1)).isoformat()
    (lapsed / MERGED).write_text(json.dumps(meta))
    root = shards["code/heldout"].parent.parent
    kw = dict(max_tokens=2048, seq_len=64, unigram=False)
    expired, notes = bpb_table(lapsed, root, **kw)
    without, _ = bpb_table(env["merged"], root, exclude=["a"], **kw)
    with_a, _ = bpb_table(env["merged"], root, **kw)
    assert expired == without != with_a
    assert any("'a' withheld: consent expired" in n for n in notes)


# ---------------------------------------------------------------- 9. atomic swap under kill -9
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flexmoe.store.fsutil import atomic_dir
    dest = Path(sys.argv[1])
    gen = 0
    while True:
        gen += 1
        with atomic_dir(dest, overwrite=True) as tmp:
            for i in range(20):
                (tmp / f"part{i}").write_text(str(gen))
            (tmp / "complete").write_text(str(gen))
    """
)


def test_atomic_dir_survives_kill_at_any_moment(tmp_path):
    dest = tmp_path / "out"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = torch.Generator().manual_seed(0)
    for _ in range(12):
        p = subprocess.Popen([sys.executable, str(script), str(dest)])
        time.sleep(0.4 + float(torch.rand((), generator=rng)) * 0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert dest.is_dir(), "a kill left no output"
        gen = (dest / "complete").read_text()
        assert all((dest / f"part{i}").read_text() == gen for i in range(20))
    leftovers = [x.name for x in tmp_path.iterdir() if x.name.startswith(".out.")]
    from flexmoe.store.fsutil import clean_leftovers

    clean_leftovers(dest)
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out.")], leftovers


# ---------------------------------------------------------------- 10. merge --base, copy first
def test_base_metadata_names_are_not_paths(env, capsys):
    evil = env["root"] / "evil-base"
    shutil.copytree(env["merged"], evil)
    meta = json.loads((evil / MERGED).read_text())
    meta["experts"] = ["public", "../../pkg-a"]
    (evil / MERGED).write_text(json.dumps(meta))
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--base", evil, "-o", env["root"] / "m-evil"], capsys
    )
    one_line_error(code, err, "not a valid name")


def test_merge_stores_exactly_the_copy_it_verified(env, monkeypatch):
    import flexmoe.lifecycle.merge as merge_mod

    src = copy_pkg(env, "swapped")
    real = merge_mod.verify_package

    def verify_then_swap(pkg, *a):
        res = real(pkg, *a)
        t = load_file(src / WEIGHTS)  # the source changes after the check
        t["layers.0.gate_proj"] += 1.0
        save_file(t, src / WEIGHTS)
        return res

    monkeypatch.setattr(merge_mod, "verify_package", verify_then_swap)
    out = env["root"] / "m-swapped"
    merge(env["anchor"], [src], out, log=None)
    model, record, extras = load_anchor(env["anchor"])
    real(out / "experts" / "a", record, extras, model)  # the stored copy still verifies


# ---------------------------------------------------------------- 11. smaller defects
def test_reserved_name_public_is_refused_by_verify(env, capsys):
    pkg = copy_pkg(env, "public-name")
    rewrite(pkg, name="public")
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "reserved")


def test_already_expired_consent_is_refused(env, shards, capsys):
    code, _, err = run_cli(
        ["expert", "train", "--anchor", env["anchor"], "--data", shards["code/train"]]
        + ["--name", "x", "--recipe", "paper", "-o", env["root"] / "never"]
        + ["--consent-expires", (TODAY - dt.timedelta(days=1)).isoformat()],
        capsys,
    )
    one_line_error(code, err, "in the past")


def test_merge_with_every_expert_excluded_is_refused(env, capsys):
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][0], "--exclude", "a"]
        + ["-o", env["root"] / "m-none"],
        capsys,
    )
    one_line_error(code, err, "every expert was excluded")
    assert not (env["root"] / "m-none").exists()


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_non_regular_package_file_is_named(env, capsys, kind):
    pkg = copy_pkg(env, f"nonreg-{kind}")
    (pkg / WEIGHTS).unlink()
    os.mkfifo(pkg / WEIGHTS) if kind == "fifo" else (pkg / WEIGHTS).mkdir()
    code, _, err = run_cli(["expert", "verify", pkg, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "not a regular file")


def test_outputs_follow_the_users_umask(env):
    old = os.umask(0o022)
    try:
        out = env["root"] / "m-umask"
        merge(env["anchor"], env["pkgs"], out, log=None)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / MERGED).stat().st_mode & 0o777 == 0o644


def test_merge_accepts_several_values_after_experts(env, capsys):
    out = env["root"] / "m-several"
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "-o", out, "--experts", *env["pkgs"]], capsys
    )
    assert code == 0, err
    assert json.loads((out / MERGED).read_text())["experts"] == ["public", "a", "b"]


# ---------------------------------------------------------------- authenticity
def test_trusted_keys_admit_only_signed_packages(env, capsys):
    key = env["root"] / "owner.key"
    code, _, err = run_cli(["keys", "new", key], capsys)
    assert code == 0, err
    signed = copy_pkg(env, "signed")
    code, _, err = run_cli(["expert", "sign", signed, "--key", key], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["expert", "verify", signed, "--anchor", env["anchor"]], capsys)
    assert code == 0 and "signed by key" in out and "valid" in out
    trusted = ["--trusted-keys", f"{key}.pub"]
    out_dir = env["root"] / "m-signed"
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", signed, "-o", out_dir, *trusted], capsys
    )
    assert code == 0, err
    meta = json.loads((out_dir / MERGED).read_text())
    assert (
        set(meta["signers"]) == {"a"} and (out_dir / "experts" / "a" / "signature.json").is_file()
    )
    code, _, err = run_cli(
        ["merge", "--anchor", env["anchor"], "--experts", env["pkgs"][1]]
        + ["-o", env["root"] / "m-unsigned", *trusted],
        capsys,
    )
    one_line_error(code, err, "unsigned")
    # a signed package whose manifest is edited afterwards (e.g. a copied fingerprint) fails
    rewrite(signed, owner="someone else")
    code, _, err = run_cli(["expert", "verify", signed, "--anchor", env["anchor"]], capsys)
    one_line_error(code, err, "tampered")
