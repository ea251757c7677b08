"""The anchor directory: an HF dense model + tokenizer, its router-space tensors and its record
(fingerprint, provenance). Every expert and merge is checked against it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import check_dense, family_of
from flexmoe.model.dense import fingerprint
from flexmoe.store.checkpoint import load_dense
from flexmoe.store.fsutil import (
    atomic_dir,
    read_json,
    regular_file,
    write_json,
)
from flexmoe.store.model_card import CARD, anchor_card

RECORD = "flexmoe_anchor.json"

ROUTER = "flexmoe_router.safetensors"  # the anchor's router-space tensors (shared by all owners)


def anchor_fingerprint(model, extras: dict[str, torch.Tensor]) -> str:
    return fingerprint(model.state_dict() | {f"flexmoe_router.{k}": v for k, v in extras.items()})


def write_anchor(model: PreTrainedModel, tokenizer, extras: dict, out: Path, record: dict) -> dict:
    """save_pretrained + tokenizer + router extras + record with fingerprint, atomically."""
    from safetensors.torch import save_file

    check_dense(model.config)
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    record = {
        **record,
        "architecture": model.config.model_type,
        "moe_type": family_of(model.config.model_type).moe_type,
        "fingerprint": anchor_fingerprint(model, extras),
        "rope_theta": rope.get("rope_theta"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(extras, tmp / ROUTER)
        write_json(tmp / RECORD, record)
        (tmp / CARD).write_text(anchor_card(record))
    return record


def load_anchor(path: Path) -> tuple[PreTrainedModel, dict, dict[str, torch.Tensor]]:
    """Load an anchor directory (model, record, router extras) and check its fingerprint."""
    from safetensors.torch import load_file

    path = Path(path)
    rec_path = path / RECORD
    if not (rec_path.exists() or rec_path.is_symlink()):
        raise FlexmoeError(f"not an anchor directory (no {RECORD}): {path}")
    record = read_json(rec_path, f"anchor record {RECORD}")
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise FlexmoeError(f"{rec_path}: not an anchor record (no fingerprint)")
    model = load_dense(path)
    check_dense(model.config)
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
