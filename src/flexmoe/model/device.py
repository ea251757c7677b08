"""Device and dtype: the one owner of where a model runs (and which experts kernel it uses)."""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.errors import FlexmoeError

# HF experts implementation per device type, measured by scripts/bench_experts_impl.py (CPU:
# eager fastest for forward and generation); FLEXMOE_EXPERTS_IMPL overrides. Masks are exact on
# all of them (tests/test_merge.py).
EXPERTS_IMPL = "eager"

EXPERTS_IMPL_BY_DEVICE = {"cpu": "eager", "cuda": "grouped_mm"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N → a device that exists here (auto = CUDA when available)."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FlexmoeError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlexmoeError(f"--device {spec}: no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlexmoeError(f"--device {spec}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise FlexmoeError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    return dev


def experts_impl_for(device: torch.device) -> str:
    import os

    return os.environ.get("FLEXMOE_EXPERTS_IMPL") or EXPERTS_IMPL_BY_DEVICE.get(
        device.type, EXPERTS_IMPL
    )


def place(model: nn.Module, device: str | torch.device | None = "auto", dtype: str | None = None):
    """Move a model to a device (and dtype), choosing the experts implementation for it."""
    dev = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise FlexmoeError(f"--dtype {dtype!r}: use {' or '.join(DTYPES)}")
    model.to(device=dev, dtype=DTYPES[dtype] if dtype else None)
    if hasattr(model, "set_experts_implementation") and getattr(model.config, "num_experts", None):
        model.set_experts_implementation(experts_impl_for(dev))
    return model


def to_storage(model: nn.Module) -> nn.Module:
    """Where every written artefact comes from, whatever device trained it: CPU, float32 (expert
    packages, anchors and merged models are stored in float32)."""
    return place(model, "cpu", "float32")
