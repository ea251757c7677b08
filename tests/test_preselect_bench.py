"""The preselection benchmark (flexmoe.evaluation.preselect_bench) on the tiny trained anchor
and two packages whose domain embeddings are their domains' real MiniLM means."""

from __future__ import annotations

import torch

from conftest import random_merged, sample_texts


def test_preselect_bench_counts_every_prompt_and_minilm_finds_the_domain(
    work, anchor_dir, tmp_path
):
    from flexmoe.evaluation.heldout import load_for_eval
    from flexmoe.evaluation.preselect_bench import LENGTHS, bench_md, run_bench
    from flexmoe.lifecycle.router_init import embed_documents

    emb = {d: embed_documents(sample_texts(d, "train", 16)) for d in ("code", "math")}
    path = random_merged(tmp_path, anchor_dir, ["code", "math"], seed=3, embeddings=emb)
    merged, tok = load_for_eval(path)
    anchor, _ = load_for_eval(anchor_dir)
    res = run_bench(merged, anchor, tok, ["code", "math"], n=4, centroid_docs=4)
    assert set(res["sets"]) == {f"{L} tokens" for L in LENGTHS} | {"hand-written"}
    for name, by_method in res["sets"].items():
        for method, acc in by_method.items():
            for d, (hits, total) in acc.items():
                assert 0 <= hits <= total
                picked = res["confusion"][name][method][d]
                assert sum(picked.values()) == total and set(picked) <= {"code", "math"}
    assert res["sets"]["hand-written"]["minilm"]["code"][1] == 8  # data/preselect-prompts.json
    for d in ("code", "math"):  # real domain embeddings: MiniLM finds 64-token held-out prompts
        hits, total = res["sets"]["64 tokens"]["minilm"][d]
        assert total == 4 and hits >= 3
    assert len(res["picks"]["texts"]) == 16 and res["picks"]["texts"][0] == "def fibonacci(n):"
    md = bench_md(res)
    assert "## 64 tokens" in md and "| minilm |" in md and "| router |" in md
    assert "| minilm+hidden |" in md
    assert torch.isfinite(torch.tensor(res["layer"], dtype=torch.float))


def test_preselect_bench_without_domain_embeddings_leaves_minilm_out(anchor_dir, tmp_path):
    from flexmoe.evaluation.heldout import load_for_eval
    from flexmoe.evaluation.preselect_bench import run_bench

    merged, tok = load_for_eval(random_merged(tmp_path, anchor_dir, ["code", "math"], seed=5))
    anchor, _ = load_for_eval(anchor_dir)
    res = run_bench(merged, anchor, tok, ["code", "math"], n=2, centroid_docs=2)
    assert set(res["sets"]["64 tokens"]) == {"hidden", "router"}
