"""The public anchor: a dense model every expert is trained against, then frozen.

An anchor directory is a stock `save_pretrained` checkpoint of a supported dense family
(flexmoe.model.arch: OLMo-2, Llama/SmolLM/Mistral, Qwen3; loadable by AutoModelForCausalLM) plus the
model's own tokenizer and `flexmoe_anchor.json`: the training or import record and the anchor
fingerprint that experts and merges use to prove which anchor they were built on. `train_anchor`
pretrains an OLMo-2 from scratch; `import_anchor` takes a pretrained local HF directory or a GGUF
file (dequantised to float32; the record says from which quantisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexmoe.data.shards import INDEX, TokenStream, tokenize_to_shards
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.router_init import (
    domain_rows,
    hidden_rows,
    projection,
    random_rows,
    sample_documents,
)
from flexmoe.model.arch import check_dense, family_of, strip_unknown_config
from flexmoe.model.dense import PRESETS, ROPE_THETA, new_anchor, olmo2_config
from flexmoe.model.device import to_storage
from flexmoe.store.anchor_dir import RECORD, write_anchor
from flexmoe.store.checkpoint import _from_pretrained
from flexmoe.store.fsutil import (
    guard_output,
    read_json,
    regular_file,
    sha256_file,
)
from flexmoe.store.records import library_versions, spec_hash
from flexmoe.train.loop import TrainConfig, make_train_config, train, unshard_for_save


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
    to_storage(model)
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


MAX_GGUF_BYTES = 64 << 30


def _check_finite(model, src: Path) -> None:
    for name, t in model.state_dict().items():
        if not torch.isfinite(t).all():
            raise FlexmoeError(f"{src}: tensor {name} has non-finite values")


def _load_hf_dir(hf_dir: Path):
    """A local HF dense checkpoint (safetensors only) of a supported family, as float32."""

    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FlexmoeError(f"not a HF checkpoint (no config.json): {hf_dir}")
    raw = read_json(cfg_path, f"{hf_dir}: config.json", 1 << 20)
    if not isinstance(raw, dict):
        raise FlexmoeError(f"{cfg_path}: not a config object")
    fam = family_of(raw.get("model_type"))
    if raw.get("model_type") not in fam.dense_types:
        raise FlexmoeError(f"{hf_dir}: {raw.get('model_type')} is not a dense model")
    if not any(hf_dir.glob("*.safetensors")):
        raise FlexmoeError(f"{hf_dir}: no .safetensors weights (pickle checkpoints are refused)")
    if "rope_theta" not in raw and "rope_theta" not in (raw.get("rope_parameters") or {}):
        raise FlexmoeError(
            f"{hf_dir}: config has no rope_theta; transformers would silently use its class "
            f"default (OLMo-2 uses {ROPE_THETA:g}). Add it to config.json explicitly."
        )
    model = _from_pretrained(fam.dense_class(raw["model_type"]), hf_dir, "dense model")
    check_dense(model.config)
    return model.float(), {"imported_from": str(hf_dir.resolve())}


def _load_gguf(gguf: Path):
    """A GGUF file via transformers' GGUF loader (dequantised to float32), rebuilt as a clean
    dense model of its family (a GGUF-loaded model refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = regular_file(gguf, "GGUF file", MAX_GGUF_BYTES)
    types = gguf_tensor_types(gguf)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
        tok = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, trust_remote_code=False
        )
    except FlexmoeError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise FlexmoeError(
            f"{gguf}: cannot load the GGUF file ({type(e).__name__}: {msg})"
        ) from None
    raw = loaded.config.to_dict()
    raw.pop("quantization_config", None)
    fam = family_of(raw.get("model_type"))
    cls = fam.dense_class(raw["model_type"])
    try:
        config = cls.config_class.from_dict(raw)
        check_dense(config)
        model = cls(config).float()
    except FlexmoeError:
        raise
    except Exception as e:
        raise FlexmoeError(f"{gguf}: unusable model configuration ({type(e).__name__})") from None
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FlexmoeError(
            f"{gguf}: weights do not fit {cls.__name__} ({(missing or unexpected)[0]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    source = {
        "imported_from": str(gguf.resolve()),
        "gguf": {
            "file": gguf.name,
            "sha256": sha256_file(gguf),
            "tensor_types": types,
            "dequantised_to": "float32",
        },
    }
    return model.eval(), source, tok


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each GGUF type (Q4_1, F32, …) the file holds: what was dequantised."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        out: dict[str, int] = {}
        for t in reader.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out
    except ImportError:
        raise FlexmoeError("GGUF import needs the gguf package: pip install gguf") from None
    except Exception as e:
        raise FlexmoeError(f"{gguf}: not a readable GGUF file ({type(e).__name__})") from None


def _public_stream(public: Path, tok, tmp_root: Path) -> TokenStream:
    """Token shards made with the model's tokenizer, or raw text (.jsonl/.txt/.parquet/HF
    dataset) that is tokenized with it into a scratch directory."""

    public = Path(public)
    if (public / INDEX).is_file():
        stream = TokenStream(public)
        if (
            stream.index["vocab_size"] != len(tok)
            or stream.index["eos_token_id"] != tok.eos_token_id
        ):
            raise FlexmoeError(f"{public} was tokenized with a different tokenizer")
        return stream
    tok_dir = tmp_root / "tokenizer"
    tok.save_pretrained(tok_dir)
    tokenize_to_shards([public], tmp_root / "public", tok_dir)
    return TokenStream(tmp_root / "public")


def import_anchor(
    hf_dir: Path | None,
    out: Path,
    public: Path,
    tokenizer_dir: Path | None = None,
    router_docs: int = 1000,
    overwrite: bool = False,
    gguf: Path | None = None,
) -> dict:
    """A pretrained dense model (local HF directory or GGUF file) of a supported family → an anchor
    directory with the model's own tokenizer, the fingerprint and the shared router space."""
    import tempfile

    if (hf_dir is None) == (gguf is None):
        raise FlexmoeError("give either a HF checkpoint directory or --gguf FILE")
    src = Path(gguf if gguf is not None else hf_dir)
    guard_output(out, "anchor", [src, public, tokenizer_dir], overwrite)
    if gguf is not None:
        model, source, tok = _load_gguf(Path(gguf))
    else:
        model, source = _load_hf_dir(Path(hf_dir))
        tok = None
    _check_finite(model, src)
    if tokenizer_dir is not None or tok is None:
        tok = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else src)
    dropped = strip_unknown_config(model.config)  # never copy a pointer to foreign code
    if tok.init_kwargs.pop("auto_map", None) is not None or getattr(tok, "_auto_map", None):
        tok._auto_map = None
        dropped.append("tokenizer auto_map")
    if len(tok) > model.config.vocab_size:
        raise FlexmoeError(
            f"tokenizer has {len(tok)} tokens > model vocab {model.config.vocab_size}"
        )
    if tok.eos_token_id is None:
        raise FlexmoeError(f"{src}: the tokenizer has no end-of-text token")
    with tempfile.TemporaryDirectory(prefix=".flexmoe-import-") as tmp:
        stream = _public_stream(Path(public), tok, Path(tmp))
        extras = router_extras(model.eval(), tok, stream, docs=router_docs)
    record = {
        "kind": "anchor",
        "source": "imported",
        **source,
        "rope_parameters": dict(getattr(model.config, "rope_parameters", None) or {}),
        "config_keys_dropped": dropped,
        "libraries": library_versions(),
    }
    return write_anchor(model, tok, extras, Path(out), record)
