"""HF model directories: what kind a directory holds, and loading one without ever running a partly
random model (missing, mismatched or foreign weights are refused)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import DENSE_TYPES, MOE_TYPES, supported
from flexmoe.store.fsutil import read_json

MAX_CONFIG_BYTES = 1 << 20


def model_type(path: Path) -> str:
    """A MOE_TYPES entry for a merged model, a DENSE_TYPES entry for an anchor or dense expert
    (flexmoe.model.arch's table); any other directory is a one-line error (it would otherwise load
    partly random)."""

    path = Path(path)
    if not path.is_dir():
        raise FlexmoeError(f"model directory not found: {path}")
    cfg = read_json(path / "config.json", f"{path}: config.json", MAX_CONFIG_BYTES)
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind not in MOE_TYPES and kind not in DENSE_TYPES:
        raise FlexmoeError(
            f"{path}: model_type {str(kind)[:40]!r} is neither a flexmoe merged model "
            f"({', '.join(MOE_TYPES)}) nor a dense anchor/expert (supported: {supported()})"
        )
    return kind


def _from_pretrained(cls, path: Path, what: str):
    """cls.from_pretrained, refusing a checkpoint that lacks weights the model needs (HF would
    initialise them randomly and run a partly random model)."""
    try:
        model, info = cls.from_pretrained(
            path,
            dtype=torch.float32,
            output_loading_info=True,
            use_safetensors=True,
            trust_remote_code=False,
        )
    except FlexmoeError:
        raise
    except Exception as e:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise FlexmoeError(f"{path}: cannot load a {what} ({msg})") from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [
        k for k in info.get("missing_keys", []) if not (tied and k.endswith("lm_head.weight"))
    ]
    if missing or info.get("mismatched_keys"):
        bad = (missing or [str(x[0]) for x in info["mismatched_keys"]])[0]
        raise FlexmoeError(f"{path}: not a complete {what} (weight {bad} missing or mismatched)")
    unexpected = [k for k in info.get("unexpected_keys", []) if "rotary_emb" not in k]
    if unexpected:  # weights of another architecture, which the model would silently ignore
        raise FlexmoeError(f"{path}: not a {what} (weight {unexpected[0]} is not part of it)")
    return model


def load_dense(path: Path):
    """An anchor or dense expert, as the dense model it is."""
    path = Path(path)
    kind = model_type(path)
    if kind in MOE_TYPES:
        raise FlexmoeError(f"{path} is a merged model, not a dense one")
    return _from_pretrained(AutoModelForCausalLM, path, f"dense {kind} model").eval()
