"""The demo's settings (`DemoConfig`) and its presets: `make demo` (pretrained()), `make
demo-scratch` (scratch()) and `make demo-full` (full())."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.data.corpus import CLOSED_DOMAINS, DEFAULT_ROOT
from flexmoe.evaluation.demo_eval import EvalSettings
from flexmoe.inference.preselect import PRESELECT_CONTEXT
from flexmoe.lifecycle.expert import make_recipe
from flexmoe.lifecycle.merge import DEFAULT_PRESELECT

PARTS = (1, 2, 3, 4)  # the parts of `make results` (DemoConfig.results)


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    anchor_source: str = "scratch"  # "scratch": train OLMo-2 | "smollm2": import the GGUF
    corpus: Path = DEFAULT_ROOT
    domains: list[str] = field(default_factory=lambda: ["code", "math", "news", "social"])
    vocab_size: int = 4096  # the lm_head is a large share of a tiny model's compute
    anchor_preset: str = "demo"
    anchor_steps: int | None = None
    expert_steps: int = 40
    expert_warmup: int = 4
    expert_lr: float = 3e-3
    dense_lr: float = 1e-3
    bf16: bool = True
    batch_size: int = 16
    seq_len: int = 256
    router_docs: int = 200
    eval_tokens: int = 8192
    seed: int = 0
    baselines: bool = True
    ablations: bool = False
    router_tuning: bool = False
    rt_proxies: int = 64
    rt_steps: int = 40
    rt_selection: str = "relevance"  # proxy selection (router_tune.SELECTIONS)
    ablation_variants: tuple[str, ...] = ("random", "hidden")  # + "no-bias" in --full
    unrestricted: bool = False  # the unrestricted-MoE references, both pools (--full)
    control: bool = False  # the anchor continued on the public split with one expert's budget
    prompt: str = "def fibonacci(n):"
    gen_exclude: str | None = None  # the expert excluded in the report's second generation
    tasks: bool = (
        False  # downstream tasks (flexmoe eval tasks) for anchor/merged/opt-outs/baselines
    )
    task_limit: int = 100
    task_optouts: bool = True  # tasks also for the merged model with each expert excluded
    preselect_bench: bool = True  # top-1 accuracy of each preselection method (report)
    recipe: str = "flexmoe"  # the default recipe; see flexmoe.expert
    recipe_overrides: dict = field(default_factory=dict)  # settings changed from the recipe's
    compare_paper: bool = True  # also train and merge the paper recipe's experts, side by side
    lean_eval: bool = False  # fewer evaluation passes (demo_eval.recipe_eval); sized for 40 min
    eval_bf16: bool = False  # evaluate under bf16 autocast (as training runs)
    source_domains: tuple[str, ...] = ("math",)  # per-source held-out BPB for these domains
    preselect_context: int = PRESELECT_CONTEXT  # tokens before a window preselection reads
    topk_sweep: bool = True  # with ablations: the merged model at every top-k

    def recipe_runs(self) -> list[tuple[str, str, object, int]]:
        """(label, directory under out, Recipe, stored preselection) per recipe the run trains,
        default first. The paper recipe is merged as the paper serves it: token routing alone."""
        pre = 0 if self.recipe == "paper" else DEFAULT_PRESELECT
        rec = make_recipe(self.recipe, **self.recipe_overrides)
        label = f"{self.recipe} recipe" + "".join(
            f", {k}={v}" for k, v in sorted(self.recipe_overrides.items())
        )
        runs = [(label, "experts", rec, pre)]
        if self.compare_paper and self.recipe != "paper":
            runs.append(("paper recipe", "experts-paper", make_recipe("paper"), 0))
        return runs

    def expert_kwargs(self) -> dict:
        """Settings shared by every expert-sized run (experts, dense experts, ablations)."""
        return dict(
            steps=self.expert_steps,
            warmup=self.expert_warmup,
            bf16=self.bf16,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            seed=self.seed,
            eval_tokens=self.eval_tokens,
        )

    def eval_settings(self) -> EvalSettings:
        """What the evaluation (flexmoe.evaluation.demo_eval) reads from this run's settings."""
        return EvalSettings(
            domains=tuple(self.domains),
            seq_len=self.seq_len,
            eval_tokens=self.eval_tokens,
            baselines=self.baselines,
            prompt=self.prompt,
            lean_eval=self.lean_eval,
            gen_exclude=self.gen_exclude,
            preselect_context=self.preselect_context,
            topk_sweep=self.topk_sweep,
        )

    @classmethod
    def pretrained(cls, out: Path = Path("runs/demo")) -> DemoConfig:
        """`make demo`: SmolLM2-135M as the anchor, 4 experts, sized (by measurement on 2 CPU
        cores) to finish in about 40 minutes; its tokenizer is the model's own."""
        return cls(
            out=out,
            anchor_source="smollm2",
            # 2-core CPU, bf16 autocast (measured): owner training ≈ 130 tok/s (+25% public
            # negatives), dense training ≈ 190 tok/s, forward ≈ 780 tok/s → 16 steps × 4 × 256
            expert_steps=16,
            expert_warmup=2,
            expert_lr=3e-4,
            dense_lr=1e-4,
            batch_size=4,
            seq_len=256,
            router_docs=200,
            eval_tokens=4096,  # 16 windows per domain: the least a window bootstrap can use
            compare_paper=False,
            lean_eval=True,
            eval_bf16=True,
            gen_exclude="code",
        )

    @classmethod
    def results(cls, part: int = 1, out: Path = Path("runs/results-smollm2")) -> DemoConfig:
        """`make results PART=n`: the evidence run on SmolLM2 (committed under results/smollm2/):
        the demo's 4 domains at 6× its training budget (96 × 4 × 256 = 98,304 tokens per expert
        and per dense expert) and 4× its held-out tokens (16,384 per domain, 64 windows), with
        the weighted soup and the public-continued control. Learning rates are the demo's (not
        tuned on the held-out splits). Each part adds stages to the previous ones and is sized
        to finish inside one working session on 2 cores when runs/ holds the earlier parts
        (their stages and evaluation rows are reused):
          1: flexmoe-recipe experts, dense experts, control, merge, held-out evaluation;
          2: + the paper recipe's experts, the unrestricted MoE (same training tokens as all
             experts together; the owners' data pooled, and in the paper's form with the public
             split pooled too), the no-coordination ablation and router tuning;
          3: + downstream tasks (the paper's Table-1 form) for the anchor, the merged model, the
             soup and BTM, 64 documents per task, bf16 autocast like the held-out evaluation;
          4: + the tasks of the merged model with each expert excluded."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}")
        cfg = dataclasses.replace(
            cls.pretrained(out),
            expert_steps=96,
            expert_warmup=10,
            eval_tokens=16384,
            control=True,
            topk_sweep=False,
        )
        if part >= 2:
            cfg.compare_paper = True
            cfg.ablations, cfg.ablation_variants, cfg.unrestricted = True, (), True
            cfg.router_tuning = True
        if part >= 3:
            # 64 docs × 15 tasks: measured 2 CPU cores, bf16, anchor ≈ 13 min, merged (top-4 of
            # 5) ≈ 31 min, BTM (all 5 models run) ≈ 65 min
            cfg.tasks, cfg.task_limit, cfg.task_optouts = True, 64, part >= 4
        return cfg

    @classmethod
    def scratch(cls, out: Path = Path("runs/demo-scratch")) -> DemoConfig:
        """`make demo-scratch`: the from-scratch pipeline (tokenizer and OLMo-2 anchor trained on
        the public split), about 10 minutes."""
        return cls(out=out)

    @classmethod
    def full(cls, out: Path = Path("runs/demo-full")) -> DemoConfig:
        """`make demo-full`: SmolLM2 anchor, all 7 domains, ablations, router tuning, the paper
        recipe beside flexmoe's, downstream tasks (hours on 2 CPU cores)."""
        return cls(
            out=out,
            anchor_source="smollm2",
            expert_lr=2e-4,
            dense_lr=1e-4,
            batch_size=8,
            tasks=True,
            domains=list(CLOSED_DOMAINS),
            expert_steps=60,
            expert_warmup=6,
            router_docs=500,
            ablations=True,
            router_tuning=True,
            # no "no-bias" / "no-calibration": on this family the recipe already trains with
            # b ≡ 0 and skips calibration (model/arch.py), so both would repeat the default
            ablation_variants=("random", "hidden", "no-negatives", "clamp-bias", "z-loss"),
            unrestricted=True,
            eval_tokens=8192,
            eval_bf16=True,
        )
