"""The one training loop: anchor pretraining, expert training and router tuning all run here.

They differ only in which parameters have requires_grad (plus optional gradient masks that freeze
rows/slices of a tensor) and which token streams they read. The loop gives:
AdamW + warmup/cosine, clipping, accumulation, optional bf16 autocast, periodic held-out loss/BPB,
a rich progress bar, a JSONL metrics log, a seed-determined data order, atomic checkpoints and an
exact `--resume`. Under `torchrun` it shards the model with FSDP2 and gives every rank its own
rows of each global batch, so N processes see the same data as one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.nn.utils import parametrize

from flexmoe.data.shards import TokenStream
from flexmoe.errors import FlexmoeError
from flexmoe.inference.bpb import evaluate_bpb
from flexmoe.model.device import place, resolve_device
from flexmoe.model.router import capture_router_logits
from flexmoe.store.fsutil import read_json, write_json


class TrainConfig(BaseModel):
    steps: int = Field(gt=0)
    batch_size: int = Field(8, gt=0, description="sequences per optimizer step (global)")
    seq_len: int = Field(256, gt=1)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    router_z_loss: float = Field(0.0, ge=0, description="weight of the router z-loss (AI2: 1e-3)")
    router_lr_scale: float = Field(1.0, gt=0, description="router rows and biases: lr × this")
    bf16: bool = False
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str | None = Field(None, description="weights: float32 | bfloat16 (None: as loaded)")
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    eval_tokens: int = Field(65536, gt=0)
    ckpt_every: int = Field(0, ge=0, description="0 = only at the end")
    log_every: int = Field(10, gt=0)
    stop_after: int | None = Field(None, description="exit after this step (testing a kill)")


def make_train_config(**fields) -> TrainConfig:
    """TrainConfig from user settings; a bad value is a one-line error naming its option."""
    from pydantic import ValidationError

    try:
        return TrainConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        opt = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "a setting"
        raise FlexmoeError(f"{opt}: {err['msg'].lower()}") from None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio·lr at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


# ---------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist_info()


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per decoder layer plus the root. Works on CPU (gloo) and GPU."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    if dist_info()[1] == 1:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def unshard_for_save(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """After distributed training: rank 0 gets a plain model holding the full weights, other
    ranks get None (only rank 0 writes outputs). A no-op in a single process."""
    rank, world = dist_info()
    if world == 1:
        return model
    state = full_state_dict(model)
    plain = build() if rank == 0 else None
    if plain is not None:
        plain.load_state_dict(state)
    dist.barrier()
    return plain


# ---------------------------------------------------------------- data
def batch_starts(n_tokens: int, cfg: TrainConfig, step: int, micro: int) -> np.ndarray:
    """Window starts of one micro-batch; a pure function of (seed, step, micro)."""
    micro_bs = cfg.batch_size // cfg.grad_accum
    rng = np.random.default_rng([cfg.seed, step, micro])
    return rng.integers(0, n_tokens - cfg.seq_len - 1, size=micro_bs)


def get_batch(stream: TokenStream, cfg: TrainConfig, step: int, micro: int) -> torch.Tensor:
    rank, world = dist_info()
    starts = batch_starts(len(stream), cfg, step, micro)[rank::world]
    return torch.from_numpy(np.stack([stream.window(int(s), cfg.seq_len + 1) for s in starts]))


# ---------------------------------------------------------------- checkpoints
CKPT_DIR = "checkpoints"


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# settings a resumed run may change (they do not alter the weights it produces)
RESUMABLE_CHANGES = {
    "stop_after",
    "ckpt_every",
    "eval_every",
    "log_every",
    "eval_tokens",
    "device",
}


def save_checkpoint(
    out: Path, model, optimizer, step: int, cfg: TrainConfig, metrics: dict | None = None
) -> Path:
    """Model, optimizer, schedule position, data position and RNG as a sharded
    torch.distributed.checkpoint (each rank writes its own shards; no gather on rank 0), made
    visible by one rename; loadable on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = dist_info()
    dest = out / CKPT_DIR / f"step_{step:07d}"
    tmp = dest.with_name(f".{dest.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is")
        dcp.save(
            {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state()},
            checkpoint_id=tmp,
        )
    if rank == 0:
        write_json(
            tmp / "state.json",
            {
                "step": step,
                "lr": lr_at(cfg, step - 1),
                "data_position": {"step": step},
                "world_size": world,
                "config": cfg.model_dump(),
                "metrics": metrics or {},
                "format": "torch.distributed.checkpoint",
            },
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        write_json(out / CKPT_DIR / "latest.json", {"step": step, "path": dest.name})
        for old in sorted((out / CKPT_DIR).glob("step_*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return dest


def latest_checkpoint(out: Path) -> Path | None:
    import re

    ptr = out / CKPT_DIR / "latest.json"
    if not ptr.is_file():
        return None
    rec = read_json(ptr, "checkpoint pointer")
    name = rec.get("path") if isinstance(rec, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"step_\d{7}", name):
        raise FlexmoeError(f"{ptr}: does not name a checkpoint (step_NNNNNNN)")
    path = out / CKPT_DIR / name
    return path if path.is_dir() else None


def drop_checkpoints(out: Path) -> None:
    """After the run's output is written: its checkpoints can only resume a finished run (they
    are the size of the model and its optimizer state, per run). metrics.jsonl stays."""
    if dist_info()[0] == 0:
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)


def resumable_step(out: str | Path, cfg: TrainConfig) -> int | None:
    """The step of the checkpoint under `out` that a run with `cfg` may continue (same
    settings), else None: a long stage of a multi-session run resumes instead of starting
    again."""
    ckpt = latest_checkpoint(Path(out))
    if ckpt is None:
        return None
    try:
        return checkpoint_state(ckpt, cfg)["step"]
    except FlexmoeError:
        return None


def checkpoint_state(path: Path, cfg: TrainConfig) -> dict:
    """state.json of a checkpoint, refusing a resume whose settings differ from the run's."""

    state = read_json(path / "state.json", f"checkpoint state {path.name}")
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or type(state.get("step")) is not int:
        raise FlexmoeError(f"{path / 'state.json'}: not a flexmoe checkpoint state")
    now = json.loads(cfg.model_dump_json())
    changed = sorted(
        k
        for k in set(now) | set(saved)
        if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} → {now.get(k)!r}" for k in changed[:4])
        raise FlexmoeError(
            f"--resume with different settings ({diffs}): resume with the original settings, "
            "or start again without --resume"
        )
    return state


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Load a sharded checkpoint into `model` and `optimizer`, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is")
            dcp.load(state, checkpoint_id=path)
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise FlexmoeError(f"checkpoint {path} is unreadable ({type(e).__name__}: {msg})") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    torch.set_rng_state(state["rng"])
    return json.loads((path / "state.json").read_text())["step"]


# ---------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    train_stream: TokenStream,
    cfg: TrainConfig,
    out: str | Path,
    eval_streams: dict[str, TokenStream] | None = None,
    token_bytes: np.ndarray | None = None,
    grad_masks: dict[str, torch.Tensor] | None = None,
    post_step: Callable[[nn.Module], None] | None = None,
    pre_step: Callable[[nn.Module, int, object], dict] | None = None,
    router_loss: Callable[[list[list[torch.Tensor]]], torch.Tensor] | None = None,
    resume: bool = False,
    progress_label: str = "train",
    restart: bool = False,
) -> dict:
    """Train `model`'s requires_grad parameters. Returns the final metrics.

    grad_masks: parameter name → 0/1 tensor multiplied into its gradient (freezes slices, e.g. the
    public expert inside a stacked expert tensor; with weight decay 0 AdamW then leaves them
    bit-identical). post_step runs after each optimizer step (e.g. projecting a bias to ≤ 0).
    pre_step(model, step, autocast) runs before the step's micro-batches and may add gradients of
    its own (e.g. expert training's public negatives); the metrics it returns are logged.
    router_loss(captured) adds a loss on the training batches' router logits (see
    model.capture_router_logits); cfg.router_z_loss adds the z-loss the same way.
    """
    out = Path(out)
    rank, world = init_distributed()
    if cfg.batch_size % (cfg.grad_accum * world):
        raise FlexmoeError(
            f"batch size {cfg.batch_size} must be divisible by grad_accum×world "
            f"({cfg.grad_accum}×{world})"
        )
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise FlexmoeError(f"--seq-len {cfg.seq_len} exceeds the model's {max_pos} positions")
    if len(train_stream) <= cfg.seq_len + 1:
        raise FlexmoeError(f"training data has {len(train_stream)} tokens; need > seq_len+1")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:  # one GPU per process under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    place(model, device, cfg.dtype)
    names = _trainable_names(model)
    if not names:
        raise FlexmoeError("nothing to train: no parameter has requires_grad")
    if world > 1:
        model = shard_model(model)
    masks = _place_masks(model, grad_masks or {})
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:  # (decays?, is a router tensor?) → one AdamW group each
            groups.setdefault((p.ndim >= 2, ".mlp.gate." in n), []).append(p)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": ps,
                "weight_decay": cfg.weight_decay if decays else 0.0,
                "lr_scale": cfg.router_lr_scale if router else 1.0,
            }
            for (decays, router), ps in sorted(groups.items())
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    start = 0
    last: dict = {}
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FlexmoeError(f"--resume given but no checkpoint under {out / CKPT_DIR}")
        last = checkpoint_state(ckpt, cfg).get("metrics") or {}
        start = load_checkpoint(ckpt, model, optimizer)
    elif latest_checkpoint(out) is not None and not restart:
        raise FlexmoeError(
            f"{out / CKPT_DIR} holds checkpoints of an earlier run: pass --resume to continue "
            "it, or --restart to discard them"
        )
    elif (out / CKPT_DIR).exists() and rank == 0:
        shutil.rmtree(out / CKPT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    if rank == 0 and log_path.exists():
        if resume:  # keep what the checkpointed steps logged; later steps are logged again
            keep = [line for line in log_path.read_text().splitlines() if _step(line) <= start]
            log_path.write_text("".join(x + "\n" for x in keep))
        else:
            log_path.unlink()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def evaluate() -> dict:
        if not eval_streams or token_bytes is None:
            return {}
        model.eval()
        res = {}
        with autocast:
            for name, stream in eval_streams.items():
                r = evaluate_bpb(
                    lambda ids: model(ids.to(device)).logits,
                    stream,
                    token_bytes,
                    cfg.seq_len,
                    batch_size=max(1, cfg.batch_size // cfg.grad_accum),
                    max_tokens=cfg.eval_tokens,
                )
                res[f"eval/{name}/loss"], res[f"eval/{name}/bpb"] = r["loss"], r["bpb"]
        model.train()
        return res

    def log(rec: dict) -> None:
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")

    tokens_per_step = cfg.batch_size * cfg.seq_len
    model.train()
    t_start = time.perf_counter()
    with _progress(rank == 0, progress_label, cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            extra = pre_step(model, step, autocast) if pre_step is not None else {}
            loss_sum = torch.zeros((), dtype=torch.float64)
            z_sum = r_sum = 0.0
            capture = cfg.router_z_loss > 0 or router_loss is not None
            for micro in range(cfg.grad_accum):
                batch = get_batch(train_stream, cfg, step, micro).to(device)
                ctx = capture_router_logits(model) if capture else nullcontext([])
                with ctx as captured, autocast, parametrize.cached():
                    logits = model(batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                total = loss
                if cfg.router_z_loss:
                    z = router_z_loss(captured)
                    total = total + cfg.router_z_loss * z
                    z_sum += float(z.detach()) / cfg.grad_accum
                if router_loss is not None:
                    r = router_loss(captured)
                    total = total + r
                    r_sum += float(r.detach()) / cfg.grad_accum
                (total / cfg.grad_accum).backward()
                loss_sum += loss.detach().double()
            for p, m in masks:
                if p.grad is not None:
                    p.grad.mul_(m)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.grad_clip
                )
                if cfg.grad_clip > 0
                else torch.zeros(())
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if post_step is not None:
                post_step(model)
            loss_val = loss_sum / cfg.grad_accum
            if world > 1:
                dist.all_reduce(loss_val, op=dist.ReduceOp.AVG)
            done = step + 1
            elapsed = time.perf_counter() - t_start
            tok_s = (done - start) * tokens_per_step / max(elapsed, 1e-9)
            last = {
                "step": done,
                "loss": float(loss_val),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": done * tokens_per_step,
                "tokens_per_s": tok_s,
                **extra,
            }
            if cfg.router_z_loss:
                last["router_z"] = z_sum
            if router_loss is not None:
                last["router_loss"] = r_sum
            if done % cfg.log_every == 0 or done == cfg.steps:
                log(last)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                log({"step": done, **evaluate()})
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
                save_checkpoint(out, model, optimizer, done, cfg, last)
            bar(done, float(loss_val), tok_s)
            if cfg.stop_after is not None and done >= cfg.stop_after:
                return {**last, "stopped": True}
    final = {**last, **evaluate(), "seconds": time.perf_counter() - t_start}
    if start < cfg.steps:  # else: resumed after the final checkpoint, already logged and saved
        log(final)
        save_checkpoint(out, model, optimizer, cfg.steps, cfg, last)
    return final


def _step(line: str) -> float:
    """The step of a metrics.jsonl line (inf for a line a kill cut short)."""
    try:
        return json.loads(line).get("step", math.inf)
    except (ValueError, AttributeError):
        return math.inf


def router_z_loss(captured: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of mean(logsumexp(router logits)²) (ST-MoE's z-loss)."""
    per_layer = [torch.cat(c).logsumexp(-1).square().mean() for c in captured if c]
    return torch.stack(per_layer).mean()


def _place_masks(model: nn.Module, grad_masks: dict[str, torch.Tensor]) -> list:
    """Pair each masked parameter with its mask, sharded like the parameter under FSDP2."""
    params = dict(model.named_parameters())
    placed = []
    for name, mask in grad_masks.items():
        if name not in params:
            raise FlexmoeError(f"gradient mask for unknown parameter {name}")
        p = params[name]
        m = mask.to(p.dtype)
        if hasattr(p, "device_mesh"):  # a DTensor shard
            from torch.distributed.tensor import distribute_tensor

            m = distribute_tensor(m, p.device_mesh, p.placements)
        placed.append((p, m))
    return placed


class _progress:
    """A rich progress bar (loss, tokens/s, ETA) on rank 0; a no-op elsewhere."""

    def __init__(self, enabled: bool, label: str, total: int, start: int):
        self.enabled, self.label, self.total, self.start = enabled, label, total, start

    def __enter__(self):
        if not self.enabled:
            return lambda *a: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
            disable=os.environ.get("FLEXMOE_NO_PROGRESS") == "1",
        )
        self.p.start()
        task = self.p.add_task(
            self.label, total=self.total, completed=self.start, loss=float("nan"), tps=0.0
        )
        return lambda done, loss, tps: self.p.update(task, completed=done, loss=loss, tps=tps)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.stop()
        return False
