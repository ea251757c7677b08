"""Selection: the one rule for which experts a request, a merge or a tenant may use (opt-out,
consent, revocation, the public expert)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.store.merged import PUBLIC, experts_of, is_merged


def public_of(names: Sequence[str]) -> str | None:
    """The expert holding the anchor's FFN: `public`; in a stock MoE checkpoint its expert_0; a
    model merged without it (--allow-no-public) has none."""
    return PUBLIC if PUBLIC in names else ("expert_0" if names and names[0] == "expert_0" else None)


def choose(
    names: Sequence[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    withheld: Iterable[str] = (),
    allow_no_public: bool = False,
) -> set[str]:
    """THE opt-out rule, for merge, generate, eval, tasks, audit and serve alike: `include` keeps
    the public expert too (it carries the shared anchor); only `exclude` with allow_no_public
    drops it; withheld experts (consent lapsed or revoked) are never kept, whatever is asked."""
    for what, given in (("--include", include), ("--exclude", exclude)):
        unknown = sorted(set(given or []) - set(names))
        if unknown:
            raise FlexmoeError(
                f"{what}: unknown expert(s) {', '.join(unknown)} (known: {', '.join(names)})"
            )
    public = public_of(names)
    keep = (set(include) | ({public} - {None})) if include else set(names)
    keep -= set(exclude or [])
    keep -= set(withheld)
    if public is not None and public not in keep and not allow_no_public:
        raise FlexmoeError(
            f"excluding the public expert '{public}' is refused (pass --allow-no-public)"
        )
    if not keep:
        raise FlexmoeError("at least one expert must stay active")
    return keep


def unavailable(
    model, name: str, use: str | None, allowed: frozenset[str] | None = None, who: str = ""
) -> str | None:
    """Why `name` may not serve this request (None if it may): withheld at load or revoked since,
    consent that does not permit `use` (checked now, so consent lapsing after the merge counts),
    or not among a tenant's `allowed` experts."""
    table = experts_of(model)
    if name in table.withheld:
        return table.withheld[name]
    m = table.manifests.get(name)
    reason = m.consent.permits(use) if m is not None else None
    if reason is None and allowed is not None and name != public_of(table.names):
        if name not in allowed:
            reason = f"tenant '{who}' may not use it"
    return reason


def expert_names(model) -> list[str]:
    return list(experts_of(model).names)


def expert_mask(
    model,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_no_public: bool = False,
) -> torch.Tensor:
    """Names → bool mask over experts. `include` keeps the public expert; only `exclude` (with
    allow_no_public) drops it, because the public expert carries the shared anchor's knowledge."""
    names = expert_names(model)
    keep = choose(names, include, exclude, experts_of(model).withheld, allow_no_public)
    return torch.tensor([n in keep for n in names], dtype=torch.bool)


def consent_exclusions(model, use: str | None) -> list[tuple[str, str]]:
    """Experts whose stored consent no longer permits `use` (or has expired): checked at every
    request, so consent that lapses after the merge is still honoured."""
    if not is_merged(model):
        return []
    out = []
    for name in expert_names(model):
        reason = unavailable(model, name, use)
        if reason is not None:
            out.append((name, reason))
    return out
