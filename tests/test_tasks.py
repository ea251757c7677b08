"""`flexmoe eval tasks`: the lm-eval plumbing on a tiny random Olmo2, from the committed OLMES
task files (no network, no HF hub)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import run_cli, sample_texts

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "olmes-tasks"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from flexmoe.data.tokenizer import train_tokenizer
    from flexmoe.model.dense import new_anchor, olmo2_config

    out = tmp_path_factory.mktemp("tasks") / "tiny"
    train_tokenizer(sample_texts("public", "train", 20, max_chars=400), out, vocab_size=300)
    from flexmoe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    cfg = olmo2_config("tiny", len(tok), tok.eos_token_id, tok.pad_token_id)
    new_anchor(cfg, seed=0).save_pretrained(out)
    return out


def test_committed_task_files_complete():
    from flexmoe.evaluation.tasks import TASKS

    for name in TASKS:
        assert (TASK_DIR / f"{name}.yaml").is_file()
        assert (TASK_DIR / f"{name}.jsonl.gz").is_file()
    assert (TASK_DIR / "utils.py").is_file()


def test_run_tasks_metrics(tiny_model):
    from flexmoe.evaluation.tasks import run_tasks

    res = run_tasks(
        tiny_model, ["arc_easy", "winogrande", "humaneval_bpb"], TASK_DIR, limit=5, batch_size=4
    )
    assert set(res) == {"arc_easy", "winogrande", "humaneval_bpb"}
    for name in ("arc_easy", "winogrande"):
        for m in ("acc", "acc_norm"):
            assert 0.0 <= res[name][m] <= 1.0
    bpb = res["humaneval_bpb"]["bits_per_byte"]
    assert math.isfinite(bpb) and bpb > 0


def test_cli_tasks_table(tiny_model, capsys):
    code, out, err = run_cli(
        ["eval", "tasks", "--model", tiny_model, "--tasks", "boolq", "--limit", "3",
         "--task-dir", TASK_DIR],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "boolq" in out and "acc_norm" in out


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--tasks", "arc_easy,nope"], "unknown task"),
        (["--task-dir", "/nonexistent/tasks"], "no task dir"),
        (["--autocast", "float16\x1b[31m"], "only bfloat16"),
    ],
)
def test_cli_tasks_bad_input(tiny_model, capsys, args, msg):
    code, _, err = run_cli(["eval", "tasks", "--model", tiny_model, *args], capsys)
    assert code == 2
    assert msg in err and len(err.strip().splitlines()) == 1


def test_include_needs_merged_model(tiny_model):
    from flexmoe.errors import FlexmoeError
    from flexmoe.evaluation.tasks import run_tasks

    with pytest.raises(FlexmoeError, match="merged"):
        run_tasks(tiny_model, ["sciq"], TASK_DIR, limit=1, include=["code"])


def test_btm_ensemble_on_tasks(tiny_model, tmp_path):
    """BTM through lm-eval: an ensemble of a model with itself scores exactly as the model; with
    another member the scores move; masks are refused."""
    from flexmoe.errors import FlexmoeError
    from flexmoe.evaluation.tasks import run_tasks
    from flexmoe.model.dense import new_anchor

    kw = dict(tasks=["arc_easy", "gsm8k_bpb"], task_dir=TASK_DIR, limit=4)
    alone = run_tasks(tiny_model, **kw)
    same = run_tasks(tiny_model, btm=[tiny_model], **kw)
    for t in alone:
        for m, v in alone[t].items():
            assert same[t][m] == pytest.approx(v, rel=1e-4, abs=1e-6), (t, m)
    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_model, other)
    from transformers import AutoConfig

    new_anchor(AutoConfig.from_pretrained(other), seed=1).save_pretrained(other)
    mixed = run_tasks(tiny_model, btm=[other], **kw)["gsm8k_bpb"]["bits_per_byte"]
    a = alone["gsm8k_bpb"]["bits_per_byte"]
    o = run_tasks(other, **kw)["gsm8k_bpb"]["bits_per_byte"]
    assert a != o and mixed != a  # the other member's predictions enter the ensemble
    assert mixed <= max(a, o) + 1e-6  # a mixture's log-loss is at most its worst member's
    with pytest.raises(FlexmoeError, match="merged model"):
        run_tasks(tiny_model, btm=[other], exclude=["code"], **kw)


def test_per_doc_results_add_up_and_bf16_autocast_scores_close(tiny_model):
    """per_doc (the paired task intervals' input) reproduces each task's metric; bf16 autocast
    (the held-out evaluation's numerics) changes scores only by rounding."""
    from flexmoe.evaluation.tasks import run_tasks

    kw = dict(tasks=["arc_easy", "gsm8k_bpb"], task_dir=TASK_DIR, limit=6)
    res = run_tasks(tiny_model, per_doc=True, **kw)
    mc = res["arc_easy"]["per_doc"]
    assert len(mc["acc_norm"]) == 6 and set(mc["acc_norm"]) <= {0.0, 1.0}
    assert sum(mc["acc_norm"]) / 6 == pytest.approx(res["arc_easy"]["acc_norm"])
    g = res["gsm8k_bpb"]["per_doc"]
    bpb = -sum(g["loglikelihood"]) / math.log(2) / sum(g["bytes"])
    assert bpb == pytest.approx(res["gsm8k_bpb"]["bits_per_byte"], rel=1e-9)
    bf = run_tasks(tiny_model, autocast="bfloat16", per_doc=True, **kw)["gsm8k_bpb"]
    assert bf["per_doc"]["bytes"] == g["bytes"]
    assert bf["bits_per_byte"] == pytest.approx(bpb, rel=0.02)
    assert bf["per_doc"]["loglikelihood"] != g["loglikelihood"]  # it did compute in bf16
