"""Model cards: README.md with Hub front matter in every merged model and expert package; the
owners' untrusted text cannot break out of the YAML or inject HTML into the page."""

from __future__ import annotations

import yaml

from conftest import random_package
from flexmoe.lifecycle.merge import merge
from flexmoe.store.model_card import CARD

HOSTILE = "Evil <script>x</script> | a\n---\nlicense: mit"


def _front(path):
    text = path.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_cards_in_packages_and_merged_models(work, anchor_dir):
    root = work / "cards"
    code = random_package(root / "code", anchor_dir, "code", 0, owner=HOSTILE)
    training = {"tokens": 0, "steps": 0, "seed": 1, "hyperparameters": {}}
    training |= {"heldout_bpb": 1.234, "anchor_heldout_bpb": 1.5}
    math = random_package(
        root / "math", anchor_dir, "math", 1, licence="CC-BY-4.0", training=training
    )
    front, body = _front(code / CARD)
    assert front["license"] == "other" and "expert-package" in front["tags"]
    assert front["flexmoe"]["expert"]["owner"] == HOSTILE  # data, quoted in YAML
    assert "<script>" not in body and "&lt;script&gt;" in body and "a\n---" not in body

    merge(anchor_dir, [code, math], root / "merged", log=None)
    front, body = _front(root / "merged" / CARD)
    assert front["license"] == "other" and front["library_name"] == "transformers"
    assert {"flexmoe", "mixture-of-experts"} <= set(front["tags"])
    experts = {e["name"]: e for e in front["flexmoe"]["experts"]}
    assert set(experts) == {"code", "math"} and experts["math"]["licence"] == "CC-BY-4.0"
    assert experts["code"]["allowed_uses"] == ["research", "commercial"]
    assert "<script>" not in body and body.count("\n| code |") == 1
    # evaluation numbers, when the package records them
    assert experts["math"]["heldout_bpb"] == 1.234 and experts["code"]["heldout_bpb"] is None
    assert "| 1.234 (1.500) |" in body


def test_card_in_every_anchor(anchor_dir):
    """The anchor writer (train, import, FlexOlmo import, dense experts) leaves a card whose
    front matter pins the anchor's fingerprint."""
    import json

    front, body = _front(anchor_dir / CARD)
    record = json.loads((anchor_dir / "flexmoe_anchor.json").read_text())
    assert front["library_name"] == "transformers" and "anchor" in front["tags"]
    assert front["flexmoe"]["fingerprint"] == record["fingerprint"]
    assert record["fingerprint"] in body and "flexmoe expert train --anchor ." in body
