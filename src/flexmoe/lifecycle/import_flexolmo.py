"""Import an AI2 FlexOlmo checkpoint (a stock Hugging Face `flex_olmo` model) as flexmoe parts: a
dense anchor plus one expert package per non-public expert.

Why: a stock FlexOlmo checkpoint is one fused model. Nobody can take one of its experts out, add
their own, or serve it with per-request opt-out. Split into flexmoe's parts, `flexmoe merge --top-k
K` rebuilds exactly the checkpoint's function (tests/test_import_flexolmo.py: max |Δlogit| ≤ 1e-5),
and every flexmoe operation then applies: `--exclude`, `merge --remove`, a new expert trained
against the anchor.

The split (expert 0 is the public expert, as in AI2's releases):
- `anchor/`: an OLMo-2 (FlexOlmo's dense sibling in flexmoe.model.arch) holding every shared tensor
  (embeddings, attention, norms, lm_head) and expert 0's FFN as its MLP. Its router extras hold
  expert 0's router row of every layer as the public row of every router-init method: a merge takes
  the public row from there, and there is only one (the methods differ only in how a NEW owner's
  row starts), next to the usual seeded projection for new owners' domain embeddings;
- `experts/NAME/`: expert e's FFN and router row per layer, bias 0. Stock FlexOlmo routers have no
  bias; flexmoe's router adds min(b, 0) (model/router.py), so a stored 0 is exactly no bias. No
  domain embedding exists, so a merge of these packages keeps preselection off.
- `flexmoe_import.json`: where it came from, the expert names in checkpoint order and top-k.
  Merging needs `--top-k K` (the checkpoint's num_experts_per_tok; merge's default is min(E, 4)).

Refused in one line: anything but a `flex_olmo` safetensors checkpoint (a flexmoe merged model
too: its parts already exist), fewer than 2 experts, `norm_topk_prob: true` and attention biases
(flexmoe's FlexOlmo merge has neither, so the round trip would not be exact), a missing tokenizer.

Consent: a checkpoint records none, yet every package manifest must state one (store/package.py:
`consent.allowed_uses`, at least one use). Inventing it would let `--use commercial` admit experts
nobody cleared, so the caller must state the allowed uses explicitly; the manifest's training record
says the consent was stated by the importer, not by the checkpoint.

Tensors are read one at a time from the safetensors files (never unpickled, never the whole MoE
in memory), in either layout: stock `save_pretrained`'s per-expert `mlp.experts.{e}.*_proj.weight`
or the fused in-memory `mlp.experts.{gate_up_proj,down_proj}`. Every tensor of the checkpoint
must be used; an unknown one means another architecture and is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.router_init import METHODS, projection
from flexmoe.model.arch import SHARED
from flexmoe.store.anchor_dir import write_anchor
from flexmoe.store.checkpoint import MAX_CONFIG_BYTES
from flexmoe.store.fsutil import (
    atomic_dir,
    guard_output,
    read_json,
    sha256_file,
    write_json,
)
from flexmoe.store.merged import MERGED
from flexmoe.store.package import MAX_TEXT, USES, tensor_sha256, validate_name, write_package
from flexmoe.store.records import library_versions

RECORD = "flexmoe_import.json"
FORMAT = "flexmoe-flexolmo-import"
KIND = "FlexOlmo import"
ANCHOR_DIR = "anchor"
EXPERTS_DIR = "experts"
DEFAULT_PREFIX = "flexolmo"
PUBLIC_EXPERT = 0  # AI2's FlexOlmo: expert 0 is the public model's FFN


@dataclass
class ImportResult:
    path: Path
    anchor: Path
    packages: list[Path]
    names: list[str]
    num_experts: int
    top_k: int
    fingerprint: str


class _Tensors:
    """Every tensor of a safetensors checkpoint by name, read on demand as float32; remembers
    which were used so that leftovers (another architecture's weights) can be refused."""

    def __init__(self, src: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        files = sorted(p for p in src.glob("*.safetensors") if p.is_file())
        if not files:
            raise FlexmoeError(f"{src}: no .safetensors weights (pickle checkpoints are refused)")
        self.src, self.where, self.used = src, {}, set()
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:
                raise FlexmoeError(
                    f"{f}: not a valid safetensors file ({type(e).__name__})"
                ) from None
            for k in handle.keys():
                self.where[k] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...], index: int | None = None) -> torch.Tensor:
        """Tensor `name` (or its row `index` of a stacked tensor) as float32, shape checked."""
        if name not in self.where:
            raise FlexmoeError(f"{self.src}: not a complete FlexOlmo checkpoint ({name} missing)")
        self.used.add(name)
        h = self.where[name]
        t = h.get_tensor(name) if index is None else h.get_slice(name)[index]
        if tuple(t.shape) != shape:
            raise FlexmoeError(
                f"{self.src}: {name} has shape {tuple(t.shape)}, expected {shape} from config.json"
            )
        t = t.float().contiguous()
        if not torch.isfinite(t).all():
            raise FlexmoeError(f"{self.src}: tensor {name} has non-finite values")
        return t

    def check_all_used(self) -> None:
        left = sorted(set(self.where) - self.used)
        if left:
            raise FlexmoeError(f"{self.src}: weight {left[0]} is not part of a FlexOlmo model")


def _read_config(src: Path):
    """The checkpoint's FlexOlmoConfig, refusing what flexmoe cannot rebuild exactly."""
    from transformers import FlexOlmoConfig

    if not src.is_dir():
        raise FlexmoeError(f"checkpoint directory not found: {src}")
    if (src / MERGED).exists():
        raise FlexmoeError(
            f"{src} is a flexmoe merged model: its packages are already in {src}/experts/"
        )
    raw = read_json(src / "config.json", f"{src}: config.json", MAX_CONFIG_BYTES)
    if not isinstance(raw, dict) or raw.get("model_type") != "flex_olmo":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise FlexmoeError(f"{src}: not a FlexOlmo checkpoint (model_type {str(kind)[:40]!r})")
    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "trust_remote_code")}
    try:
        cfg = FlexOlmoConfig.from_dict(raw)
    except Exception as e:
        raise FlexmoeError(f"{src}: unusable FlexOlmo config ({type(e).__name__})") from None
    n, k = cfg.num_experts, cfg.num_experts_per_tok
    if not isinstance(n, int) or n < 2:
        raise FlexmoeError(f"{src}: {n} expert(s); a FlexOlmo import needs at least 2")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise FlexmoeError(f"{src}: num_experts_per_tok {k} is not between 1 and {n}")
    if cfg.norm_topk_prob:
        raise FlexmoeError(
            f"{src}: norm_topk_prob is true; flexmoe's FlexOlmo merges never renormalise top-k "
            "weights, so the imported model would compute something else"
        )
    if cfg.attention_bias:
        raise FlexmoeError(
            f"{src}: attention biases are not supported (flexmoe's FlexOlmo has none)"
        )
    return cfg


def _anchor_model(cfg, tensors: _Tensors):
    """The dense OLMo-2 with the checkpoint's shared tensors and expert 0's FFN."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    kwargs = {k: getattr(cfg, k) for k in SHARED if hasattr(cfg, k)}
    # rope always explicit: FlexOlmoConfig's default theta is 500,000, Olmo2Config's 10,000
    dense_cfg = Olmo2Config(
        **kwargs, rope_parameters=dict(cfg.rope_parameters), attention_bias=False
    )
    with torch.device("meta"):
        model = Olmo2ForCausalLM(dense_cfg)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(dense_cfg)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    state = {}
    for name, t in model.state_dict().items():
        if ".mlp." in name:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings and name not in tensors:
            continue  # tied: the embedding is the head
        state[name] = tensors.get(name, tuple(t.shape))
    for i in range(cfg.num_hidden_layers):
        gate, up, down = _expert_ffn(tensors, i, PUBLIC_EXPERT, h, inter)
        p = f"model.layers.{i}.mlp"
        state |= {f"{p}.gate_proj.weight": gate, f"{p}.up_proj.weight": up}
        state[f"{p}.down_proj.weight"] = down
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise FlexmoeError(
            f"{tensors.src}: weights do not fit OLMo-2 ({(missing or unexpected)[0]})"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _expert_ffn(
    tensors: _Tensors, layer: int, e: int, h: int, inter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (I,H), up (I,H), down (H,I)) of expert e in a layer, from either on-disk layout."""
    p = f"model.layers.{layer}.mlp.experts"
    if f"{p}.gate_up_proj" in tensors:  # fused: gate rows, then up rows
        gate_up = tensors.get(f"{p}.gate_up_proj", (2 * inter, h), index=e)
        down = tensors.get(f"{p}.down_proj", (h, inter), index=e)
        return gate_up[:inter].clone(), gate_up[inter:].clone(), down
    return (
        tensors.get(f"{p}.{e}.gate_proj.weight", (inter, h)),
        tensors.get(f"{p}.{e}.up_proj.weight", (inter, h)),
        tensors.get(f"{p}.{e}.down_proj.weight", (h, inter)),
    )


def import_flexolmo(
    src: Path,
    out: Path,
    allowed_uses: Sequence[str],
    expires: dt.date | None = None,
    owner: str = "unknown",
    licence: str = "unspecified",
    names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Split a stock `flex_olmo` checkpoint into OUT/anchor/ and OUT/experts/NAME/ (experts 1..E−1,
    named `names` or flexolmo-1, …), atomically: the output appears complete or not at all.

    `allowed_uses` (research/commercial, at least one) is the consent written into every
    package: the checkpoint records none, so the caller must state it (module docstring)."""
    src, out = Path(src), Path(out)
    out = guard_output(out, KIND, [src], overwrite)
    uses = list(dict.fromkeys(allowed_uses or []))
    if not uses:
        raise FlexmoeError(
            "a FlexOlmo checkpoint records no consent: state the uses its experts' owners allow "
            f"with --consent-use ({' | '.join(USES)})"
        )
    for use in uses:
        if use not in USES:
            raise FlexmoeError(f"unknown use '{use}' (choose from {', '.join(USES)})")
    if expires is not None and expires < dt.date.today():
        raise FlexmoeError(f"--consent-expires {expires.isoformat()} is already in the past")
    for what, text in (("--owner", owner), ("--licence", licence)):
        if not 1 <= len(text) <= MAX_TEXT:
            raise FlexmoeError(f"{what} must be 1 to {MAX_TEXT} characters")
    cfg = _read_config(src)
    n, k = cfg.num_experts, cfg.num_experts_per_tok
    names = list(names) if names else [f"{DEFAULT_PREFIX}-{e}" for e in range(1, n)]
    if len(names) != n - 1:
        raise FlexmoeError(f"--names gives {len(names)} names for the {n - 1} non-public experts")
    for name in names:
        validate_name(name)
    if len(set(names)) != len(names):
        raise FlexmoeError("--names must not repeat a name")
    tok = load_tokenizer(src)
    if tok.eos_token_id is None:
        raise FlexmoeError(f"{src}: the tokenizer has no end-of-text token")
    if len(tok) > cfg.vocab_size:
        raise FlexmoeError(f"{src}: tokenizer has {len(tok)} tokens > model vocab {cfg.vocab_size}")
    if tok.init_kwargs.pop("auto_map", None) is not None or getattr(tok, "_auto_map", None):
        tok._auto_map = None  # never copy a pointer to foreign code
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    source = {
        "format": "flex_olmo",
        "checkpoint": str(src.resolve()),
        "config_sha256": sha256_file(src / "config.json"),
        "num_experts": n,
        "top_k": k,
        "norm_topk_prob": False,
    }
    with contextlib.ExitStack() as stack, atomic_dir(out, overwrite=True) as tmp:
        tensors = _Tensors(src, stack)
        model = _anchor_model(cfg, tensors)
        routers = [tensors.get(f"model.layers.{i}.mlp.gate.weight", (n, h)) for i in range(layers)]
        public = torch.stack([r[PUBLIC_EXPERT] for r in routers]).contiguous()
        extras = {"projection": projection(h).contiguous()}
        extras |= {f"public.{m}": public.clone() for m in METHODS}
        record = {
            "kind": "anchor",
            "source": "imported",
            "imported_from": source["checkpoint"],
            "flexolmo": {**source, "public_expert": PUBLIC_EXPERT, "experts": names},
            "rope_parameters": dict(cfg.rope_parameters),
            "libraries": library_versions(),
        }
        anchor = write_anchor(model, tok, extras, tmp / ANCHOR_DIR, record)
        del model
        packages = []
        for e, name in enumerate(names, start=1):
            pkg: dict[str, torch.Tensor] = {}
            for i in range(layers):
                gate, up, down = _expert_ffn(tensors, i, e, h, inter)
                p = f"layers.{i}"
                pkg |= {f"{p}.gate_proj": gate, f"{p}.up_proj": up, f"{p}.down_proj": down}
                pkg |= {f"{p}.router": routers[i][e].clone(), f"{p}.bias": torch.zeros(())}
            manifest = {
                "name": name,
                "domain": f"FlexOlmo expert {e} of {src.resolve().name}"[:MAX_TEXT],
                "owner": owner,
                "licence": licence,
                "consent": {
                    "allowed_uses": uses,
                    "expires": expires.isoformat() if expires else None,
                },
                "anchor_fingerprint": anchor["fingerprint"],
                "public_router_sha256": tensor_sha256(extras["public.domain"]),
                "architecture": {
                    "model_type": "flex_olmo",
                    "hidden_size": h,
                    "intermediate_size": inter,
                    "num_hidden_layers": layers,
                    "hidden_act": cfg.hidden_act,
                },
                # FlexOlmo starts router rows from domain embeddings, as flexmoe's default does
                "router_init": "domain",
                "training": {
                    "tokens": 0,
                    "steps": 0,
                    "seed": 0,
                    "hyperparameters": {},
                    "imported_from": {**source, "expert_index": e},
                    "consent_stated_by": "the importer (--consent-use), not the checkpoint",
                },
                "created_with": library_versions(),
            }
            write_package(tmp / EXPERTS_DIR / name, pkg, manifest)
            packages.append(out / EXPERTS_DIR / name)
        tensors.check_all_used()
        write_json(
            tmp / RECORD,
            {
                "format": FORMAT,
                **{k_: v for k_, v in source.items() if k_ != "format"},
                "anchor": ANCHOR_DIR,
                "anchor_fingerprint": anchor["fingerprint"],
                "public_expert": PUBLIC_EXPERT,
                "experts": names,
            },
        )
    return ImportResult(out, out / ANCHOR_DIR, packages, names, n, k, anchor["fingerprint"])


def merge_command(res: ImportResult) -> str:
    """The `flexmoe merge` line that rebuilds the checkpoint from the imported parts."""
    import shlex

    experts = shlex.quote(",".join(str(p) for p in res.packages))
    anchor = shlex.quote(str(res.anchor))
    return f"flexmoe merge --anchor {anchor} --experts {experts} --top-k {res.top_k} -o MERGED"
