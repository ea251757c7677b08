"""llama.cpp beside flexmoe: the same token ids through a GGUF export in llama.cpp (xllamacpp, the
optional `flexmoe[llamacpp]` extra) and through the model flexmoe loads, routed the way the file
is (token routing over the exported experts, no router bias, no preselection)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.evaluation.demo_eval import inference_variant
from flexmoe.model.router import routing
from flexmoe.selection import expert_mask
from flexmoe.store.merged import is_merged


def partial_tokens(tokenizer) -> list[int]:
    """Ids whose text alone is not whole UTF-8 (byte pieces of a character). llama.cpp holds such
    a token back until the character completes and reports no probabilities for it, so token-level
    comparisons keep both sides from choosing them."""
    return [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]


class LlamaCpp:
    """One llama.cpp model in this process (its server API; greedy decoding).

    exact=True runs it in f32 end to end (KV cache in f32, flash attention off): llama.cpp's
    defaults (f16 KV cache, flash attention where it can) move log-probabilities by ~1e-3 even
    for an f32 file. `banned` token ids are never chosen (see partial_tokens)."""

    def __init__(
        self,
        gguf: Path,
        threads: int = 2,
        n_ctx: int = 512,
        exact: bool = False,
        banned: Sequence[int] = (),
    ):
        try:
            import xllamacpp as xlc
        except ImportError:
            raise FlexmoeError(
                "llama.cpp is not installed: pip install 'flexmoe[llamacpp]' (xllamacpp)"
            ) from None
        p = xlc.CommonParams()
        p.model.path = str(gguf)
        p.n_ctx = n_ctx
        p.n_parallel = 1
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = False
        if exact:
            p.cache_type_k = p.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
            p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.server = xlc.Server(p)
        self.bias = [[int(i), False] for i in banned]

    def _complete(self, ids: Sequence[int], n: int, n_probs: int = 0) -> dict:
        req = {
            "prompt": [int(i) for i in ids],
            "n_predict": n,
            "n_probs": n_probs,
            "temperature": 0.0,
            "top_k": 1,
            "samplers": ["top_k"],
            "cache_prompt": False,
            "return_tokens": True,
            "ignore_eos": True,
            "logit_bias": self.bias,
        }
        res = self.server.handle_completions(req)
        if not isinstance(res, dict) or "choices" not in res:
            raise FlexmoeError(f"llama.cpp refused the request: {str(res)[:200]}")
        return res

    def next_logprobs(self, ids: Sequence[int], n_probs: int = 8) -> dict[int, float]:
        """The n_probs most likely next tokens after `ids` → their log-probabilities (before
        sampling: the softmax of the model's logits)."""
        res = self._complete(ids, 1, n_probs)
        probs = res["choices"][0].get("logprobs")
        if not probs:
            raise FlexmoeError(
                "llama.cpp reported no probabilities: the token it chose is part of a character "
                "(pass banned=partial_tokens(tokenizer))"
            )
        first = probs["content"][0]
        return {int(t["id"]): float(t["logprob"]) for t in first["top_logprobs"]}

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        res = self._complete(ids, n, 1)
        return [int(t["id"]) for t in res["choices"][0]["logprobs"]["content"]]

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of `text` (its /tokenize endpoint), no special tokens added."""
        url = f"{self.server.listening_address.rstrip('/')}/tokenize"
        body = json.dumps({"content": text, "add_special": False}).encode()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return [int(i) for i in json.loads(r.read())["tokens"]]


class AsExported:
    """`with AsExported(model, exclude=[…]):` flexmoe's model computing what the GGUF file holds:
    the other experts masked, router bias off, token routing."""

    def __init__(self, model, include=None, exclude=None, allow_no_public: bool = False):
        self.model = model
        self.mask = (
            expert_mask(model, include, exclude, allow_no_public) if is_merged(model) else None
        )

    def __enter__(self):
        self.stack = []
        if self.mask is not None:
            v = inference_variant(self.model, "stock")
            r = routing(self.model, self.mask)
            v.__enter__()
            r.__enter__()
            self.stack = [r, v]
        return self

    def __exit__(self, *exc):
        for c in self.stack:
            c.__exit__(*exc)
        return False

    @torch.no_grad()
    def next_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)])
        logits = self.model(input_ids=x).logits[0, -1].float()
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def greedy(self, ids: Sequence[int], n: int, banned: Sequence[int] = ()) -> list[int]:
        x = torch.tensor([list(ids)])
        out = self.model.generate(
            suppress_tokens=list(banned) or None,
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        return out[0, x.shape[1] :].tolist()
