"""Model cards: the README.md with YAML front matter that the Hugging Face Hub shows for a model,
written into every merged model and expert package.

The front matter is made by `huggingface_hub.ModelCardData` (a YAML dump, so no text can break
out of it); the experts' owner, licence and consent come from untrusted manifests, so in the
Markdown body they are escaped (HTML, table pipes, control characters) and bounded.
"""

from __future__ import annotations

import html
import unicodedata
from typing import Any

CARD = "README.md"
TAGS = ["flexmoe", "flexolmo", "mixture-of-experts", "opt-out"]


def md_cell(text: object, limit: int = 200) -> str:
    """Untrusted text as one Markdown table cell: no HTML, no pipes, no line breaks."""
    s = "".join(
        " " if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else c
        for c in str(text)[:limit]
    )
    return html.escape(s).replace("|", "\\|").replace("`", "&#96;")


def _expert_row(m: dict[str, Any]) -> dict[str, Any]:
    consent = m.get("consent") or {}
    dp = (m.get("training") or {}).get("dp") or {}
    return {
        "name": m.get("name"),
        "domain": m.get("domain"),
        "owner": m.get("owner"),
        "licence": m.get("licence"),
        "allowed_uses": consent.get("allowed_uses"),
        "consent_expires": consent.get("expires"),
        "dp_epsilon": dp.get("epsilon"),
        # the owner's held-out BPB at training time (its 2-expert model, and the anchor's)
        "heldout_bpb": (m.get("training") or {}).get("heldout_bpb"),
        "anchor_heldout_bpb": (m.get("training") or {}).get("anchor_heldout_bpb"),
    }


def _card(data: dict[str, Any], body: list[str]) -> str:
    from huggingface_hub import ModelCardData

    front = ModelCardData(**data).to_yaml()
    return "---\n" + front + "\n---\n\n" + "\n".join(body) + "\n"


def _experts_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| expert | domain | owner | licence | allowed uses | consent expires | DP ε "
        "| held-out BPB (anchor) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        uses = ", ".join(r["allowed_uses"] or []) or "–"
        cells = [r["name"], r["domain"], r["owner"], r["licence"], uses]
        cells += [r["consent_expires"] or "–", "–" if r["dp_epsilon"] is None else r["dp_epsilon"]]
        own, base = r.get("heldout_bpb"), r.get("anchor_heldout_bpb")
        cells.append(
            "–"
            if not isinstance(own, (int, float))
            else f"{own:.3f}" + (f" ({base:.3f})" if isinstance(base, (int, float)) else "")
        )
        out.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return out


def merged_card(meta: dict[str, Any], architecture: str) -> str:
    """The card of a merged model: its experts (owner, licence, consent, DP) and how to use it."""
    rows = [_expert_row(m) for m in (meta.get("manifests") or {}).values()]
    data = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "other",
        "tags": [*TAGS, architecture],
        "flexmoe": {
            "format": meta.get("format"),
            "anchor_fingerprint": meta.get("anchor_fingerprint"),
            "top_k": meta.get("top_k"),
            "experts": rows,
        },
    }
    body = [
        "# A FlexOlmo-style merged model (flexmoe)",
        "",
        f"A `{md_cell(architecture)}` mixture of experts: the public anchor's FFN as the public "
        "expert plus one expert per data owner, each trained alone against the frozen anchor and "
        "merged without joint training. Any expert can be excluded per request, exactly "
        "(excluded = never merged), and answers carry their attribution.",
        "",
        "## Experts",
        "",
        "The public expert is the anchor's. The licence of each expert's weights and its owner's "
        "consent are the owner's; the model is licensed as the most restrictive of them.",
        "",
        *_experts_table(rows),
        "",
        "## Use",
        "",
        "```bash",
        "flexmoe generate --model . --prompt 'def fibonacci(n):' --exclude <expert> --attribution",
        "flexmoe serve --model . --keys keys.toml     # OpenAI-compatible, per-request experts",
        "```",
        "",
        "`AutoModelForCausalLM.from_pretrained` loads it as the stock class without flexmoe's "
        "router bias; flexmoe's loader (`flexmoe.store.merged.load_merged`) adds it back and "
        "honours revocations.",
    ]
    return _card(data, body)


def package_card(manifest: dict[str, Any]) -> str:
    """The card of an expert package: whose expert, under which licence and consent."""
    row = _expert_row(manifest)
    data = {"license": "other", "tags": [*TAGS, "expert-package"], "flexmoe": {"expert": row}}
    body = [
        f"# flexmoe expert package: {md_cell(row['name'])}",
        "",
        "One data owner's expert (FFN, router row and bias), trained alone against a frozen "
        "public anchor. It holds weights and a manifest, never data; `flexmoe expert verify` "
        "checks it against the anchor, `flexmoe merge` adds it to a merged model.",
        "",
        *_experts_table([row]),
        "",
        f"Anchor fingerprint: `{md_cell(manifest.get('anchor_fingerprint'))}`.",
    ]
    return _card(data, body)


def anchor_card(record: dict[str, Any]) -> str:
    """The card of an anchor (or of a dense expert, the anchor continued on one domain): what it
    is, where it came from, and how owners train experts against it."""
    kind = record.get("kind", "anchor")
    arch = str(record.get("architecture"))
    source = record.get("imported_from")
    origin = {
        "kind": kind,
        "architecture": arch,
        "fingerprint": record.get("fingerprint"),
        "parameters": record.get("parameters"),
        "source": record.get("source"),
        "imported_from": None if source is None else str(source).rsplit("/", 1)[-1],
    }
    data = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "other",
        "tags": [*TAGS, kind, arch],
        "flexmoe": origin,
    }
    if kind == "dense-expert":
        title = "# flexmoe dense expert (a baseline)"
        what = (
            "The anchor continued on one domain with every parameter trained: the dense baseline "
            "a FlexOlmo merge is compared with (model soup, BTM). It is not an expert package."
        )
        use = ["flexmoe eval bpb --model . --data tokens/"]
    else:
        title = "# flexmoe anchor"
        what = (
            "The public dense model that every data owner trains an expert against, frozen; its "
            "FFN becomes the public expert of every merge. The fingerprint below pins it: a "
            "package trained against another anchor is refused at merge."
        )
        use = [
            "flexmoe expert train --anchor . --data tokens/mine --name mine -o experts/mine",
            "flexmoe merge --anchor . --experts experts/mine -o merged/",
        ]
    body = [
        title,
        "",
        f"A `{md_cell(arch)}` model, {origin['parameters'] or 0:,} parameters. {what}",
        "",
        f"Fingerprint: `{md_cell(origin['fingerprint'])}`"
        + (f"; imported from `{md_cell(origin['imported_from'])}`." if source else "."),
        "The licence is that of the model it was imported from or trained on (`license: other`).",
        "",
        "## Use",
        "",
        "```bash",
        *use,
        "```",
    ]
    return _card(data, body)


def gguf_card(manifests: list[dict[str, Any]], architecture: str, qtype: str, top_k: int) -> str:
    """The card carried inside a GGUF export (`flexmoe.model_card`): the experts in the file (the
    allowed subset), with owner, licence, consent and DP, and how to run it with llama.cpp."""
    rows = [_expert_row(m) for m in manifests]
    data = {
        "library_name": "gguf",
        "pipeline_tag": "text-generation",
        "license": "other",
        "tags": [*TAGS, "gguf", "llama.cpp", architecture],
        "flexmoe": {"format": "flexmoe-gguf", "type": qtype, "top_k": top_k, "experts": rows},
    }
    what = (
        f"A `{md_cell(architecture)}` mixture of experts for llama.cpp: the public expert plus "
        "the experts listed below, and no others (experts not allowed at export are not in the "
        f"file). Each token uses its top {top_k}; flexmoe's router bias and request-level "
        "preselection are not represented."
        if rows
        else f"A dense `{md_cell(architecture)}` model for llama.cpp (a flexmoe anchor or dense "
        "expert)."
    )
    body = [
        "# A flexmoe GGUF export",
        "",
        what,
        "",
        *(
            [
                "## Experts",
                "",
                "The licence of each expert's weights and its owner's consent are the owner's; "
                "the file is licensed as the most restrictive of them. llama.cpp cannot enforce "
                "a consent expiry after export.",
                "",
                *_experts_table(rows),
                "",
            ]
            if rows
            else []
        ),
        "## Use",
        "",
        "```bash",
        "llama-cli -m model.gguf -p 'def fibonacci(n):'      # or llama-server, ollama, LM Studio",
        "```",
    ]
    return _card(data, body)
