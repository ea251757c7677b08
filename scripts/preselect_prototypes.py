"""Preselection statistics compared on the SmolLM2 results run (issue 23, an experiment, not the
product's code path): which summary of an owner's MiniLM embeddings picks the right expert for
held-out windows (the 256 tokens before each scored window, as `eval bpb` preselects) and for the
benchmark's prompts (first 32/64 tokens of held-out documents; hand-written prompts).

    OMP_NUM_THREADS=1 python scripts/preselect_prototypes.py > results/preselect/prototypes.txt

Per owner: 200 document heads (what `expert train` embeds today: sample_documents, seed 0) and
200 random 256-token windows of the owner's train split; A = today's mean of the heads; B mean of
the windows; C/D/F = 8 k-means prototypes (windows / heads / both), an expert scored by its
closest prototype; E = mean of both. "win D" = share of D's held-out windows sent to expert D
(for public windows: the counts per expert). results/preselect/oracle shows that on math and code
windows the domain's own expert is also the best one in hindsight (math: 63 of 63 windows).
"""

import json
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.evaluation.preselect_bench import heldout_prompts
from flexmoe.inference.bpb import eval_windows
from flexmoe.lifecycle.router_init import sample_documents
from flexmoe.model.embedding import embed_texts

run = Path("runs/results-smollm2")
tok = load_tokenizer(run / "anchor")
owners = ["code", "math", "news", "social"]
oracle = json.loads(Path("results/preselect/oracle/oracle.json").read_text())
protos = {}
rng = np.random.default_rng(0)
for d in owners:
    s = TokenStream(run / "tokens" / d / "train")
    heads = sample_documents(s, tok, 200, 0)
    starts = rng.integers(0, len(s) - 257, size=200)
    wins = [tok.decode(s.window(int(x), 256).tolist()) for x in starts]
    eh, ew = embed_texts(heads), embed_texts(wins)

    def km(e, k=8):
        c = KMeans(k, n_init=4, random_state=0).fit(e).cluster_centers_
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    protos[d] = {
        "A heads mean": eh.mean(0, keepdims=True),
        "B windows mean": ew.mean(0, keepdims=True),
        "C windows k8": km(ew),
        "D heads k8": km(eh),
        "E heads+windows mean": np.concatenate([eh, ew]).mean(0, keepdims=True),
        "F heads+windows k8": km(np.concatenate([eh, ew])),
    }
    print(d, "done", flush=True)
methods = list(protos["code"])


def picks(texts, m):
    q = embed_texts([t or " " for t in texts])
    sc = np.stack(
        [
            (q @ (protos[d][m] / np.linalg.norm(protos[d][m], axis=1, keepdims=True)).T).max(1)
            for d in owners
        ],
        1,
    )
    return [owners[i] for i in sc.argmax(1)]


res = {}
# held-out windows, label = domain
for d in ["public", *owners]:
    s = TokenStream(run / "tokens" / d / "heldout")
    starts = [x for x in eval_windows(s, 256, 16384) if x > 0]
    texts = [tok.decode(s.window(max(x - 256, 0), min(x, 256)).tolist()) for x in starts]
    for m in methods:
        p = picks(texts, m)
        res.setdefault(m, {})[f"win {d}"] = (
            np.mean([x == d for x in p]) if d != "public" else {o: p.count(o) for o in owners}
        )
pr = heldout_prompts(tok, owners, 100)
for k, items in pr.items():
    for m in methods:
        p = picks([t for _, t in items], m)
        res[m][k] = float(np.mean([a == b for (a, _), b in zip(items, p, strict=True)]))
for m in methods:
    print(m, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res[m].items()})
