"""Aggregation of the K shard adapters: the weights (APA attention, routing, uniform) and the
parameter-level mixture that applies them in one forward pass.

APA, for a request x with frozen embedding e(x) (from the trunk's pass, components.model):
    neighbours  = the n validation samples most similar to e(x) (cosine)
    error_k     = mean over neighbours of |label - P_k(yes)|   (P_k cached per adapter version)
    w           = softmax(-tau * error) over unmasked shards; a masked shard gets 0
Mixture, in place of every adapted linear layer (W x is the frozen layer):
    non-decomposed: W x + sum_k w_k s_k B_k (A_k x)
    decomposed:     W x + s (sum_k w_k B_k)(sum_k w_k A_k) x
Each row of a batch carries its own w; A and B of all adapters are stacked, so the sum is a few
batched matmuls and no merged weight is ever built per request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.model import TrunkOutput, answer_token_ids, head_logits, p_yes, pad_states, tokenize, trunk_pass
from components.train import save_atomic

STATE_FILE = "state.pt"


# --- the aggregator state: validation index + cached predictions ---------------------------------


@dataclass
class AggregatorState:
    sample_ids: list[str]  # validation samples (user data: forgetting removes rows)
    labels: torch.Tensor  # [n]
    embeddings: torch.Tensor  # [n, d] frozen-model embeddings
    predictions: dict[int, torch.Tensor]  # shard -> [n] P_k(yes), cached when the version was made

    def save(self, folder: Path) -> Path:
        save_atomic(
            {"sample_ids": self.sample_ids, "labels": self.labels, "embeddings": self.embeddings,
             "predictions": {str(k): v for k, v in self.predictions.items()}},
            folder / STATE_FILE,
        )
        return folder

    @classmethod
    def load(cls, folder: Path) -> "AggregatorState":
        raw = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        return cls(raw["sample_ids"], raw["labels"], raw["embeddings"], {int(k): v for k, v in raw["predictions"].items()})

    def without(self, sample_ids: set[str]) -> "AggregatorState":
        keep = torch.tensor([s not in sample_ids for s in self.sample_ids], dtype=torch.bool)
        return AggregatorState(
            [s for s in self.sample_ids if s not in sample_ids], self.labels[keep], self.embeddings[keep],
            {k: v[keep] for k, v in self.predictions.items()},
        )

    def shards(self) -> list[int]:
        return sorted(self.predictions)


# --- weights --------------------------------------------------------------------------------------


def apa_weights(
    query: torch.Tensor, state: AggregatorState, neighbours: int, tau: float, masked: set[int] = frozenset()
) -> torch.Tensor:
    """The APA attention of each request over the shards, shape [batch, K] (K = state.shards())."""
    shards = state.shards()
    if not state.sample_ids:  # every validation sample forgotten: no evidence, equal weights
        return uniform_weights(len(query), shards, masked)
    keys = nn.functional.normalize(state.embeddings.float(), dim=-1)
    similarity = nn.functional.normalize(query.float(), dim=-1) @ keys.T  # [b, n]
    nearest = similarity.topk(min(neighbours, len(state.sample_ids)), dim=-1).indices  # [b, m]
    predictions = torch.stack([state.predictions[k] for k in shards]).float()  # [K, n]
    error = (state.labels.float()[nearest].unsqueeze(1) - predictions[:, nearest].transpose(0, 1)).abs().mean(-1)
    return masked_softmax(-tau * error, shards, masked)


def masked_softmax(logits: torch.Tensor, shards: list[int], masked: set[int]) -> torch.Tensor:
    keep = torch.tensor([k not in masked for k in shards])
    if not keep.any():
        raise ValueError("every shard is masked: no adapter may serve")
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def uniform_weights(batch: int, shards: list[int], masked: set[int] = frozenset()) -> torch.Tensor:
    return masked_softmax(torch.zeros(batch, len(shards)), shards, masked)


def routing_weights(ranking: np.ndarray, shards: list[int], masked: set[int] = frozenset()) -> torch.Tensor:
    """LMEraser: all weight on the nearest prototype's shard (the next nearest if it is masked or
    not in the set). `ranking` is [batch, K]: each row's shards from nearest to farthest."""
    ranking = np.asarray(ranking).reshape(len(ranking), -1)
    weights = torch.zeros(len(ranking), len(shards))
    for row, order in enumerate(ranking):
        shard = next((int(s) for s in order if int(s) not in masked and int(s) in shards), None)
        if shard is None:
            raise ValueError("every shard is masked: no adapter may serve")
        weights[row, shards.index(shard)] = 1.0
    return weights


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
        self.weights: torch.Tensor | None = None  # [batch, K]; None = frozen base only
        self.decomposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.weights is None:
            return out
        w = self.weights.to(x.dtype)
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"mixture weights for {w.shape[0]} rows, input has {x.shape[0]}")
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
    def mixing(self, weights: torch.Tensor | None, decomposed: bool = False):
        with self.lock:
            for layer in self.layers:
                layer.weights, layer.decomposed = weights, decomposed
            try:
                yield
            finally:
                for layer in self.layers:
                    layer.weights = None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TrunkOutput:
        """The trunk's pass over a batch of prompts: states for the head and the embedding for
        the weights, both from one forward."""
        with self.lock:  # with trunk_layers 0 the trunk's layers are mixture layers: keep them unmixed
            return trunk_pass(self.model, tokenize(self.tokenizer, prompts, self.model_config.max_length), self.model_config)

    @torch.no_grad()
    def p_yes(self, inputs: TrunkOutput, weights: torch.Tensor, decomposed: bool = False) -> torch.Tensor:
        """P(yes) of each row under its own mixture weights [batch, K]."""
        if self.prompts is not None:
            if weights.shape != (len(inputs), len(self.shards)):
                raise ValueError(f"weights of shape {tuple(weights.shape)} for {len(inputs)} rows and {len(self.shards)} shards")
            prompt = torch.einsum("bk,kvh->bvh", weights.to(self.prompts.dtype), self.prompts)
            return p_yes(head_logits(self.model, inputs.states, inputs.mask, self.model_config, prompt), self.yes_id, self.no_id)
        with self.mixing(weights, decomposed):
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


# --- one entry point for every method: serving, evaluation and verification use it -------------


def load_mixture(config, adapter_files: dict[int, Path], tokenizer, base: nn.Module | None = None) -> MixtureModel:
    """The base model with the shard adapters saved at `adapter_files` (shard -> adapter.pt)."""
    from components.model import load_base_model

    adapters = {k: torch.load(path, map_location="cpu", weights_only=True) for k, path in adapter_files.items()}
    base = base if base is not None else load_base_model(config.model, config.seed, tokenizer)
    return MixtureModel(base, tokenizer, adapters, config.adapter.alpha / config.adapter.r, config.model)


def stored_inputs(states: list[torch.Tensor], embeddings) -> TrunkOutput:
    """A batch of stored samples as the head's input: their trunk states, left-padded, and their
    stored embeddings."""
    padded, mask = pad_states(states)
    return TrunkOutput(padded, mask, torch.as_tensor(np.stack(list(embeddings))).float())


def mixture_weights(config, mixture: MixtureModel, inputs: TrunkOutput, state: AggregatorState | None, partitioner,
                    masked: set[int] = frozenset(), method: str | None = None) -> torch.Tensor:
    """The per-row shard weights [batch, K] of `method` (default config.aggregate.method)."""
    method = method or config.aggregate.method
    if method in ("uniform", "average"):
        return uniform_weights(len(inputs), mixture.shards, masked)
    if method == "routing":
        if partitioner is None or partitioner.centroids is None:
            raise ValueError(f"routing needs a semantic or adaptive partitioner (this one is {getattr(partitioner, 'method', None)!r})")
        return routing_weights(partitioner.ranking(inputs.embedding.numpy()), mixture.shards, masked)
    if state is None or state.shards() != mixture.shards:
        raise ValueError(f"the aggregator state covers shards {None if state is None else state.shards()}, "
                         f"the adapters are {mixture.shards}")
    return apa_weights(inputs.embedding, state, config.aggregate.neighbours, config.aggregate.tau, masked)


@torch.no_grad()
def predict(config, mixture: MixtureModel, batches: Iterable[TrunkOutput], state: AggregatorState | None, partitioner,
            masked: set[int] = frozenset(), method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """P(yes) and the shard weights of every row of `batches` (trunk outputs: of prompts, from
    `MixtureModel.encode`, or of stored samples, from `stored_inputs`) under an aggregation method."""
    method = method or config.aggregate.method
    scores, weights = [], []
    for inputs in batches:
        w = mixture_weights(config, mixture, inputs, state, partitioner, masked, method)
        if method == "average":
            scores.append(mixture.p_yes_averaged(inputs, masked))
        else:
            scores.append(mixture.p_yes(inputs, w, decomposed=method == "decomposed"))
        weights.append(w)
    if not scores:
        return np.zeros(0), np.zeros((0, len(mixture.shards)))
    return torch.cat(scores).numpy(), torch.cat(weights).numpy()


# --- serving: one adapter set held in memory, and the prompts of a request ---------------------------
# (Pure Python + torch: the Ray Serve application in serving/ is HTTP wiring around these.)


@dataclass
class ServedSet:
    """An adapter set loaded fully into memory (adapters, aggregator state, public partitioner),
    ready to answer; a server swaps whole ServedSets, never parts of one."""

    version: str
    shards: dict[int, dict]  # shard -> {"name", "version", "adapter_sha256"} as registered
    mixture: MixtureModel
    state: AggregatorState | None
    partitioner: object | None  # components.partition.Partitioner
    method: str

    def predict(self, config, prompts: list[str], masked: set[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
        """P(yes) [n] and shard weights [n, K] of prompts scored together: one pass of the trunk
        (the attention's embedding and the head's input), one of the head."""
        return predict(config, self.mixture, [self.mixture.encode(prompts)], self.state, self.partitioner, set(masked),
                       self.method)

    def serving(self, masked: set[int]) -> list[int]:
        """The shards that may serve under `masked`."""
        return [k for k in self.mixture.shards if k not in masked]


def load_served_set(config, adapter_set, tokenizer=None) -> ServedSet:
    """Build a ServedSet from a downloaded adapter set (components.registry.AdapterSet: version,
    shards with their `local` folders, folder with aggregator/). Checks each adapter against its
    registered sha256. Everything is read into memory: the files may be deleted afterwards."""
    from components.model import load_tokenizer
    from components.partition import Partitioner
    from components.train import ADAPTER_FILE, tensors_sha256

    folder = Path(adapter_set.folder)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    adapters, shards = {}, {}
    for shard, info in sorted(adapter_set.shards.items()):
        adapter = torch.load(Path(info["local"]) / ADAPTER_FILE, map_location="cpu", weights_only=True)
        digest = tensors_sha256(adapter)
        if info.get("adapter_sha256") and info["adapter_sha256"] != digest:
            raise ValueError(f"adapter of shard {shard} ({info.get('name')} v{info.get('version')}) does not match "
                             f"its registered sha256 {info['adapter_sha256']} (got {digest})")
        adapters[int(shard)] = adapter
        shards[int(shard)] = {"name": info.get("name"), "version": str(info.get("version")), "adapter_sha256": digest}
    state_dir = folder / "aggregator"
    state = AggregatorState.load(state_dir) if (state_dir / STATE_FILE).exists() else None
    partitioner = Partitioner.load(state_dir / "partitioner.npz") if (state_dir / "partitioner.npz").exists() else None
    method = config.aggregate.method
    if method in ("attention", "decomposed") and (state is None or state.shards() != sorted(adapters)):
        raise ValueError(f"adapter set {adapter_set.version}: aggregation {method!r} needs the aggregator state of "
                         f"shards {sorted(adapters)}, found {None if state is None else state.shards()}")
    if method == "routing" and (partitioner is None or partitioner.centroids is None):
        raise ValueError(f"adapter set {adapter_set.version}: routing needs the public semantic/adaptive partitioner")
    from components.model import load_base_model

    base = load_base_model(config.model, config.seed, tokenizer)
    mixture = MixtureModel(base, tokenizer, adapters, config.adapter.alpha / config.adapter.r, config.model)
    return ServedSet(str(adapter_set.version), shards, mixture, state, partitioner, method)


def served_mask(registry_mask: set[int], current_mask: set[int], loaded_pins: dict[int, str],
                live_pins: dict[int, str] | None) -> set[int]:
    """The shards a server must not use. The registry's mask, plus every shard this server has
    masked whose loaded version is not the live one: a forget job unmasks a shard once its clean
    version is live, and the old version in memory must stay masked until the new set is loaded.
    `live_pins` None (unknown) counts every loaded shard as stale."""
    stale = {k for k, v in loaded_pins.items() if live_pins is None or str(live_pins.get(k)) != str(v)}
    return set(registry_mask) | (stale & set(current_mask))


def history_split(history: list[tuple[object, float]], titles: dict[str, str], liked_above: float,
                  history_len: int) -> tuple[list[str], list[str]]:
    """TALLRec's liked / disliked titles from a history of (item id, rating), oldest first: the
    latest `history_len` interactions, liked if rating > liked_above (data.liked_above, as in training)."""
    recent = list(history)[-history_len:] if history_len else []
    liked = [titles[str(item)] for item, rating in recent if rating > liked_above]
    disliked = [titles[str(item)] for item, rating in recent if rating <= liked_above]
    return liked, disliked


def unknown_items(item_ids, titles: dict[str, str]) -> list:
    """The ids (as given) that the catalogue does not hold, in order, without repeats."""
    seen, unknown = set(), []
    for item in item_ids:
        if str(item) not in titles and str(item) not in seen:
            seen.add(str(item))
            unknown.append(item)
    return unknown


def candidate_prompts(liked: list[str], disliked: list[str], candidates, titles: dict[str, str], template: str) -> list[str]:
    """One prompt per candidate item (data.prompt), the same text training and evaluation use."""
    from components.data import build_prompt

    return [build_prompt(liked, disliked, titles[str(item)], template) for item in candidates]
