"""The public anchor: a dense OLMo-2 model every expert is trained against, then frozen.

An anchor directory is a stock `save_pretrained` Olmo2 checkpoint (loadable by
AutoModelForCausalLM) plus the tokenizer and `flexmoe_anchor.json`: the training or import record
and the anchor fingerprint that experts and merges use to prove which anchor they were built on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError
from flexmoe.fsutil import (
    atomic_dir,
    guard_output,
    read_json,
    regular_file,
    sha256_file,
    write_json,
)
from flexmoe.model import PRESETS, ROPE_THETA, fingerprint, new_anchor, olmo2_config, place
from flexmoe.records import library_versions, spec_hash
from flexmoe.train import TrainConfig, make_train_config, train, unshard_for_save

RECORD = "flexmoe_anchor.json"
ROUTER = "flexmoe_router.safetensors"  # the anchor's router-space tensors (shared by all owners)


def router_extras(
    model,
    tokenizer,
    public: TokenStream,
    seed: int = 0,
    docs: int = 1000,
    windows: int = 32,
    seq_len: int = 256,
) -> dict[str, torch.Tensor]:
    """The projection and the public router rows for each init method, computed once per anchor
    so every owner (and the merge) uses bit-identical public rows."""
    import numpy as np

    from flexmoe.router_init import (
        domain_rows,
        hidden_rows,
        projection,
        random_rows,
        sample_documents,
    )

    cfg = model.config
    proj = projection(cfg.hidden_size)
    texts = sample_documents(public, tokenizer, docs, seed)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, max(len(public) - seq_len, 1), size=windows)
    ids = torch.from_numpy(np.stack([public.window(int(s), seq_len) for s in starts]))
    return {
        "projection": proj.contiguous(),
        "public.domain": domain_rows(texts, proj, cfg.num_hidden_layers).contiguous(),
        "public.hidden": hidden_rows(model, ids).contiguous(),
        "public.random": random_rows(cfg.num_hidden_layers, cfg.hidden_size, seed).contiguous(),
    }


def anchor_fingerprint(model, extras: dict[str, torch.Tensor]) -> str:
    return fingerprint(model.state_dict() | {f"flexmoe_router.{k}": v for k, v in extras.items()})


def open_streams(
    data: Path, tokenizer_dir: Path, evals: dict[str, Path] | None
) -> tuple[TokenStream, dict[str, TokenStream]]:
    """Open training and held-out shards; refuse shards made with a different tokenizer."""
    tok_sha = sha256_file(Path(tokenizer_dir) / "tokenizer.json")
    streams = {"train": TokenStream(data)} | {k: TokenStream(v) for k, v in (evals or {}).items()}
    for name, s in streams.items():
        if s.index["tokenizer_sha256"] != tok_sha:
            raise FlexmoeError(f"{s.path} ({name}) was tokenized with a different tokenizer")
    train_stream = streams.pop("train")
    return train_stream, streams


def train_config_for(preset: str, **overrides) -> TrainConfig:
    p = PRESETS[preset]
    base = dict(
        steps=p.steps,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        lr=p.lr,
        warmup=p.warmup,
        weight_decay=0.1,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return make_train_config(**base)


def train_anchor(
    data: Path,
    out: Path,
    tokenizer_dir: Path,
    preset: str = "demo",
    evals: dict[str, Path] | None = None,
    resume: bool = False,
    reuse: bool = False,
    router_docs: int = 1000,
    overwrite: bool = False,
    restart: bool = False,
    **overrides,
) -> dict:
    """Pretrain a dense Olmo2 anchor on public token shards and write the anchor directory."""
    if preset not in PRESETS:
        raise FlexmoeError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    out = guard_output(out, "anchor", [data, tokenizer_dir, *(evals or {}).values()], overwrite)
    tok = load_tokenizer(tokenizer_dir)
    cfg = train_config_for(preset, **overrides)
    train_stream, eval_streams = open_streams(data, tokenizer_dir, evals)
    spec = {
        "preset": preset,
        "train": cfg.model_dump(exclude={"stop_after", "device"}),
        "data": [s["sha256"] for s in train_stream.index["shards"]],
        "tokenizer": train_stream.index["tokenizer_sha256"],
        "kind": "anchor",
        "router_docs": router_docs,
    }
    if reuse and (out / RECORD).is_file():
        rec = json.loads((out / RECORD).read_text())
        if rec.get("spec_hash") == spec_hash(spec):
            return rec
    model_cfg = olmo2_config(preset, len(tok), tok.eos_token_id, tok.pad_token_id)
    model = new_anchor(model_cfg, cfg.seed)
    work = out.with_name(out.name + ".train")
    result = train(
        model,
        train_stream,
        cfg,
        work,
        eval_streams=eval_streams,
        token_bytes=token_byte_lengths(tok),
        resume=resume,
        restart=restart,
        progress_label=f"anchor ({preset})",
    )
    model = unshard_for_save(model, lambda: new_anchor(model_cfg, cfg.seed))
    if result.get("stopped") or model is None:
        return result
    place(model, "cpu", "float32")
    model.eval()
    extras = router_extras(model, tok, train_stream, seed=cfg.seed, docs=router_docs)
    record = {
        "kind": "anchor",
        "source": "trained",
        "preset": preset,
        "spec_hash": spec_hash(spec),
        "training": {
            **result,
            "config": cfg.model_dump(),
            "seed": cfg.seed,
            "data": str(data),
            "data_tokens": len(train_stream),
        },
        "libraries": library_versions(),
    }
    return write_anchor(model, tok, extras, out, record)


def write_anchor(model: Olmo2ForCausalLM, tokenizer, extras: dict, out: Path, record: dict) -> dict:
    """save_pretrained + tokenizer + router extras + record with fingerprint, atomically."""
    from safetensors.torch import save_file

    if model.config.model_type != "olmo2":
        raise FlexmoeError(f"an anchor must be an OLMo-2 model, got {model.config.model_type}")
    record = {
        **record,
        "fingerprint": anchor_fingerprint(model, extras),
        "rope_theta": model.config.rope_parameters["rope_theta"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(extras, tmp / ROUTER)
        write_json(tmp / RECORD, record)
    return record


def import_anchor(
    hf_dir: Path,
    out: Path,
    public: Path,
    tokenizer_dir: Path | None = None,
    router_docs: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Validate a local HF OLMo-2 dense checkpoint and write it in the anchor layout."""
    hf_dir = Path(hf_dir)
    guard_output(out, "anchor", [hf_dir, public, tokenizer_dir], overwrite)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FlexmoeError(f"not a HF checkpoint (no config.json): {hf_dir}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FlexmoeError(f"{cfg_path}: invalid JSON ({e.msg})") from None
    if raw.get("model_type") != "olmo2":
        raise FlexmoeError(f"{hf_dir}: model_type is {raw.get('model_type')!r}, expected 'olmo2'")
    if not any(hf_dir.glob("*.safetensors")):
        raise FlexmoeError(f"{hf_dir}: no .safetensors weights (pickle checkpoints are refused)")
    config = Olmo2Config.from_pretrained(hf_dir)
    rope = dict(config.rope_parameters or {})
    if "rope_theta" not in raw and "rope_theta" not in (raw.get("rope_parameters") or {}):
        raise FlexmoeError(
            f"{hf_dir}: config has no rope_theta; Olmo2Config would silently use 10000 "
            f"(OLMo-2 uses {ROPE_THETA:g}). Add it to config.json explicitly."
        )
    try:
        model = Olmo2ForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32)
    except Exception as e:
        raise FlexmoeError(f"{hf_dir}: cannot load weights ({type(e).__name__}: {e})") from None
    for name, t in model.state_dict().items():
        if not torch.isfinite(t).all():
            raise FlexmoeError(f"{hf_dir}: tensor {name} has non-finite values")
    tok_src = Path(tokenizer_dir) if tokenizer_dir else hf_dir
    tok = load_tokenizer(tok_src)
    if len(tok) > config.vocab_size:
        raise FlexmoeError(f"tokenizer has {len(tok)} tokens > model vocab {config.vocab_size}")
    public_stream = TokenStream(public)
    if public_stream.index["vocab_size"] != len(tok):
        raise FlexmoeError(f"{public} was tokenized with a different tokenizer")
    extras = router_extras(model.eval(), tok, public_stream, docs=router_docs)
    record = {
        "kind": "anchor",
        "source": "imported",
        "imported_from": str(hf_dir.resolve()),
        "rope_parameters": rope,
        "libraries": library_versions(),
    }
    return write_anchor(model, tok, extras, Path(out), record)


def load_anchor(path: Path) -> tuple[Olmo2ForCausalLM, dict, dict[str, torch.Tensor]]:
    """Load an anchor directory (model, record, router extras) and check its fingerprint."""
    from safetensors.torch import load_file

    from flexmoe.infer import load_dense

    path = Path(path)
    rec_path = path / RECORD
    if not (rec_path.exists() or rec_path.is_symlink()):
        raise FlexmoeError(f"not an anchor directory (no {RECORD}): {path}")
    record = read_json(rec_path, f"anchor record {RECORD}")
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise FlexmoeError(f"{rec_path}: not an anchor record (no fingerprint)")
    model = load_dense(path)
    if model.config.model_type != "olmo2":
        raise FlexmoeError(f"{path}: an anchor must be an OLMo-2 model")
    cfg = model.config
    limit = 4 * cfg.hidden_size * (3 * cfg.num_hidden_layers + 384) + (1 << 20)
    router = regular_file(path / ROUTER, f"anchor router file {ROUTER}", limit)
    try:
        extras = load_file(router)
    except Exception:
        raise FlexmoeError(f"{router}: not a valid safetensors file") from None
    if anchor_fingerprint(model, extras) != record["fingerprint"]:
        raise FlexmoeError(f"anchor {path}: weights do not match the recorded fingerprint")
    return model.eval(), record, extras


def remove_work_dir(out: Path) -> None:
    shutil.rmtree(Path(out).with_name(Path(out).name + ".train"), ignore_errors=True)
