"""`flexmoe expert compress`: a low-rank expert package (FlexMoRE, arXiv 2602.08818).

Each FFN matrix of the owner's expert is stored as the truncated SVD of its difference from the
anchor's (expert − anchor = U·S·Vᵀ, kept to rank r: u = U·S, v = Vᵀ). The anchor is pinned by the
package's fingerprint, so verification rebuilds the full matrices from it and everything after
(merge, opt-out, the stock export, GGUF) sees an ordinary expert. The router row, bias and domain
embedding are kept as they are. `--rank R` keeps R per matrix; `--energy E` the smallest rank per
matrix whose singular values hold a share E of that matrix's squared delta norm."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.fsutil import guard_output
from flexmoe.store.package import FFN, max_rank, verify_package, write_package
from flexmoe.store.records import library_versions


def _rank(s: torch.Tensor, rank: int | None, energy: float | None, cap: int) -> int:
    if rank is not None:
        return min(rank, cap)
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 1
    share = torch.cumsum(e, 0) / total
    return min(int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1, cap)


def compress_package(
    package: Path,
    anchor_dir: Path,
    out: Path,
    rank: int | None = None,
    energy: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Verify `package` against the anchor, then write its low-rank form to `out` (unsigned: the
    owner signs the new package). Returns the new manifest."""
    if (rank is None) == (energy is None):
        raise FlexmoeError("give exactly one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise FlexmoeError(f"--rank must be ≥ 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise FlexmoeError(f"--energy must be in (0, 1], got {energy}")
    guard_output(out, "expert package", [anchor_dir, package], overwrite)
    anchor, record, extras = load_anchor(anchor_dir)
    m, tensors = verify_package(package, record, extras, anchor)

    stored: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if not k.endswith(FFN)}
    ranks: dict[str, int] = {}
    kept = total = 0.0
    full = small = 0
    for i, layer in enumerate(anchor.model.layers):
        for proj in FFN:
            name = f"layers.{i}.{proj}"
            base = getattr(layer.mlp, proj).weight.detach().float().cpu()
            delta = tensors[name].double() - base.double()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = _rank(s, rank, energy, max_rank(*delta.shape))
            ranks[name] = r
            kept += float(s[:r].square().sum())
            total += float(s.square().sum())
            stored[f"{name}.u"] = (u[:, :r] * s[:r]).float()
            stored[f"{name}.v"] = vh[:r].float()
            full += delta.numel()
            small += r * sum(delta.shape)
    manifest = json.loads(m.model_dump_json(exclude={"tensors", "compression"}))
    manifest["created_with"] = library_versions()
    manifest["compression"] = {
        "method": "svd-delta",
        "ranks": ranks,
        "energy": kept / total if total > 0 else 1.0,
        "parameters_full": full,
        "parameters_stored": small,
    }
    return write_package(Path(out), stored, manifest).model_dump(mode="json")
