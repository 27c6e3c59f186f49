"""The parameter-level mixture of K shard adapters: every adapted linear layer holds the K LoRA
adapters stacked and mixes them per row of the batch (or, for prompt tuning, the K soft prompts are
mixed), so one forward pass of the head serves a batch of mixed requests. The weights come from
components.aggregate.

Mixture, in place of every adapted linear layer (W x is the frozen layer):
    non-decomposed: W x + sum_k w_k s_k B_k (A_k x)
    decomposed:     W x + s (sum_k w_k B_k)(sum_k w_k A_k) x
Each row of a batch carries its own w; A and B of all adapters are stacked, so the sum is a few
batched matmuls and no merged weight is ever built per request.

Sparse (aggregate.top_m, aggregate.weight_mass): each row names the m adapters it mixes (an index
[batch, m] into the K) and their weights [batch, m]; the layer gathers those rows' A and B into a
rank-(m r) pair per row, so the cost per token is that of m adapters, whatever K.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

from components.model import TrunkOutput, answer_token_ids, head_logits, p_yes, tokenize, trunk_pass

# --- the mixture layers ---------------------------------------------------------------------------


class MixtureLoRALinear(nn.Module):
    """A frozen linear layer plus K stacked LoRA adapters mixed per row of the batch.

    Non-decomposed, the K adapters are one rank-(K r) adapter: A_cat = [A_1; ...; A_K] and
    B_cat = [B_1 ... B_K], and a row's weights scale its K blocks of r intermediate features:
        sum_k w_k s_k B_k (A_k x) = B_cat (diag(repeat(w s, r)) (A_cat x))
    Two matmuls for the whole batch, whatever K; the [batch, tokens, K r] intermediate is small.
    """

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a)  # [K, r, in]
        self.register_buffer("lora_b", lora_b)  # [K, out, r]
        self.register_buffer("scaling", scaling)  # [K]
        k, r, d_in = lora_a.shape
        self.rank = r
        self.register_buffer("a_cat", lora_a.reshape(k * r, d_in).contiguous(), persistent=False)  # [K r, in]
        self.register_buffer("b_cat", lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], k * r).contiguous(), persistent=False)  # [out, K r]
        self.register_buffer("b_rows", lora_b.transpose(1, 2).contiguous(), persistent=False)  # [K, r, out]: gathered by the sparse path
        self.weights: torch.Tensor | None = None  # [batch, K], or [batch, m] with index; None = frozen base only
        self.index: torch.Tensor | None = None  # [batch, m]: the adapters each row mixes; None = all K
        self.decomposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.weights is None:
            return out
        w = self.weights.to(x.dtype)
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"mixture weights for {w.shape[0]} rows, input has {x.shape[0]}")
        if self.index is not None:
            return out + self._sparse_delta(x, w).reshape(out.shape)
        row = (w.shape[0],) + (1,) * (x.dim() - 2)  # broadcast a row's weights over its tokens
        if self.decomposed:
            a = torch.einsum("bk,kri->bri", w, self.lora_a)  # sum_k w_k A_k, per row: [b, r, in]
            b = torch.einsum("bk,kor->bor", w, self.lora_b)  # sum_k w_k B_k, per row: [b, out, r]
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.matmul(torch.matmul(x3, a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling[0]
            return out + delta.reshape(out.shape)
        ws = (w * self.scaling.to(x.dtype)).repeat_interleave(self.rank, dim=1)  # [b, K r]
        hidden = nn.functional.linear(x, self.a_cat) * ws.reshape(*row, -1)
        return out + nn.functional.linear(hidden, self.b_cat)

    def _sparse_delta(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The adapters' term for rows that each mix m adapters (self.index) with weights w [b, m]:
        each row's m A's and B's gathered into one rank-(m r) pair, then two batched matmuls."""
        b, m = self.index.shape
        x3 = x.reshape(b, -1, x.shape[-1])  # [b, tokens, in]
        a = self.lora_a[self.index]  # [b, m, r, in]
        if self.decomposed:
            a = torch.einsum("bm,bmri->bri", w, a)  # sum over the row's adapters of w_k A_k: [b, r, in]
            lora_b = torch.einsum("bm,bmor->bor", w, self.lora_b[self.index])  # [b, out, r]
            return torch.bmm(torch.bmm(x3, a.transpose(1, 2)), lora_b.transpose(1, 2)) * self.scaling[0]
        ws = (w * self.scaling[self.index].to(x.dtype)).repeat_interleave(self.rank, dim=1)  # [b, m r]
        hidden = torch.bmm(x3, a.reshape(b, m * self.rank, -1).transpose(1, 2)) * ws.unsqueeze(1)  # [b, tokens, m r]
        return torch.bmm(hidden, self.b_rows[self.index].reshape(b, m * self.rank, -1))  # B_cat of the row: [b, m r, out]


def _lora_layers(adapter: dict[str, torch.Tensor]) -> list[str]:
    """Module paths (relative to the causal LM) of the layers an adapter's LoRA state adapts."""
    suffix = ".lora_A.weight"
    return sorted(k[len("base_model.model.") : -len(suffix)] for k in adapter if k.endswith(suffix))


class MixtureModel:
    """One frozen base model with all K shard adapters attached as mixture layers (LoRA) or as a
    stack of soft prompts (prompt tuning). The trunk runs once per batch; one pass of the head
    serves a batch of mixed requests."""

    def __init__(self, base: nn.Module, tokenizer, adapters: dict[int, dict[str, torch.Tensor]], scaling: float,
                 model_config):
        self.model, self.tokenizer, self.model_config = base, tokenizer, model_config
        if not adapters:
            raise ValueError("a mixture needs at least one adapter")
        self.shards = sorted(adapters)
        self.yes_id, self.no_id = answer_token_ids(tokenizer, model_config)
        # The mixture weights are set on the shared modules for the duration of a forward: one
        # forward at a time per model (threads of a server included).
        self.lock = threading.RLock()
        stacked = [adapters[k] for k in self.shards]
        self.prompts = None
        self.layers: list[MixtureLoRALinear] = []
        if "prompt_embeddings" in stacked[0]:
            self.prompts = torch.stack([a["prompt_embeddings"] for a in stacked])  # [K, v, hidden]
            return
        for path in _lora_layers(stacked[0]):
            parent_path, name = path.rsplit(".", 1)
            parent = base.get_submodule(parent_path)
            linear = getattr(parent, name)
            linear = linear.base if isinstance(linear, MixtureLoRALinear) else linear
            # In the base layer's dtype: a bfloat16 or float16 model mixes in its own precision.
            a = torch.stack([ad[f"base_model.model.{path}.lora_A.weight"] for ad in stacked]).to(linear.weight.dtype)
            b = torch.stack([ad[f"base_model.model.{path}.lora_B.weight"] for ad in stacked]).to(linear.weight.dtype)
            layer = MixtureLoRALinear(linear, a, b, torch.full((len(stacked),), float(scaling)))
            setattr(parent, name, layer)
            self.layers.append(layer)

    @contextmanager
    def mixing(self, weights: torch.Tensor | None, decomposed: bool = False, index: torch.Tensor | None = None):
        with self.lock:
            for layer in self.layers:
                layer.weights, layer.decomposed, layer.index = weights, decomposed, index
            try:
                yield
            finally:
                for layer in self.layers:
                    layer.weights, layer.index = None, None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TrunkOutput:
        """The trunk's pass over a batch of prompts: states for the head and the embedding for
        the weights, both from one forward."""
        with self.lock:  # with trunk_layers 0 the trunk's layers are mixture layers: keep them unmixed
            return trunk_pass(self.model, tokenize(self.tokenizer, prompts, self.model_config.max_length), self.model_config)

    @torch.no_grad()
    def p_yes(self, inputs: TrunkOutput, weights: torch.Tensor, decomposed: bool = False,
              index: torch.Tensor | None = None) -> torch.Tensor:
        """P(yes) of each row under its own mixture weights [batch, K]; with `index` [batch, m], the
        weights [batch, m] are those of the adapters at the index's columns (a sparse mixture)."""
        if self.prompts is not None:
            if index is not None:  # a soft prompt's mix costs the same whatever K: mix the dense weights
                weights, index = torch.zeros(len(inputs), len(self.shards)).scatter(1, index, weights.float()), None
            if weights.shape != (len(inputs), len(self.shards)):
                raise ValueError(f"weights of shape {tuple(weights.shape)} for {len(inputs)} rows and {len(self.shards)} shards")
            prompt = torch.einsum("bk,kvh->bvh", weights.to(self.prompts.dtype), self.prompts)
            return p_yes(head_logits(self.model, inputs.states, inputs.mask, self.model_config, prompt), self.yes_id, self.no_id)
        if index is not None and index.shape != weights.shape:
            raise ValueError(f"index of shape {tuple(index.shape)} for weights of shape {tuple(weights.shape)}")
        with self.mixing(weights, decomposed, index):
            return p_yes(head_logits(self.model, inputs.states, inputs.mask, self.model_config), self.yes_id, self.no_id)

    @torch.no_grad()
    def p_yes_averaged(self, inputs: TrunkOutput, masked: set[int] = frozenset()) -> torch.Tensor:
        """SISA: K passes of the head, one per unmasked adapter, and the mean of their P(yes)."""
        live = [i for i, k in enumerate(self.shards) if k not in masked]
        if not live:
            raise ValueError("every shard is masked: no adapter may serve")
        total = torch.zeros(len(inputs))
        for i in live:
            one_hot = torch.zeros(len(inputs), len(self.shards))
            one_hot[:, i] = 1.0
            total += self.p_yes(inputs, one_hot)
        return total / len(live)
