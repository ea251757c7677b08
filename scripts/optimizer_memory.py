"""What expert training asks of the optimizer, counted on the `meta` device (nothing allocated).

    python scripts/optimizer_memory.py            # presets 1b and 7b

For an owner's 2-expert model it counts the trainable elements the optimizer sees, and the bytes
of their gradients (fp32) and AdamW state (exp_avg + exp_avg_sq, fp32), in two layouts:
- "masked": the public slice frozen by zeroing its gradient inside the stacked expert tensors and
  router weights (flexmoe before owner-only parameters): the optimizer holds both experts;
- "owner-only": the owner's FFN and router rows are parameters of their own (model.owner_only).
"""

from __future__ import annotations

import argparse

import torch


def count(preset: str, owner_params: bool) -> dict[str, int]:
    from flexmoe.lifecycle.expert import freeze_for_expert
    from flexmoe.model.arch import moe_config
    from flexmoe.model.dense import olmo2_config
    from flexmoe.model.router import install_routers

    cfg = moe_config(olmo2_config(preset, 100_352, 0, 1), num_experts=2, top_k=2)
    with torch.device("meta"):
        from transformers import FlexOlmoForCausalLM

        model = install_routers(FlexOlmoForCausalLM(cfg))
        freeze_for_expert(model, owner_params=owner_params)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": n, "grad_bytes": 4 * n, "adam_bytes": 8 * n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["1b", "7b"])
    args = ap.parse_args()
    print(f"{'preset':6s} {'layout':10s} {'trainable':>15s} {'grads':>10s} {'AdamW state':>12s}")
    for preset in args.presets:
        for label, owner in (("masked", False), ("owner-only", True)):
            c = count(preset, owner)
            print(
                f"{preset:6s} {label:10s} {c['trainable']:15,d} {c['grad_bytes'] / 2**30:9.1f}G"
                f" {c['adam_bytes'] / 2**30:11.1f}G"
            )


if __name__ == "__main__":
    main()
