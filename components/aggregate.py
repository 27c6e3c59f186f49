"""Aggregation of the K shard adapters: the weights of each method (APA attention, routing,
uniform, SISA's average) and the one entry point, `predict`, that serving, evaluation and
verification use; the mixture that applies the weights in one forward pass is components.mixture.

APA, for a request x with frozen embedding e(x) (from the trunk's pass, components.model):
    neighbours  = the n validation samples most similar to e(x) (cosine)
    error_k     = mean over neighbours of |label - P_k(yes)|   (P_k cached per adapter version)
    w           = softmax(-tau * error) over unmasked shards; a masked shard gets 0
(`apa_weights`). Each method is a small `Aggregation` object in AGGREGATIONS: the one place to add one.

Sparse mixture (aggregate.top_m, aggregate.weight_mass; `top_weights`): a row keeps its largest
APA weights, renormalised, and reports the mass d it left out. Changing the weights from w to the
kept w' moves them by |w' - w|_1 = 2d; where P(yes) is linear in the weights (to first order in the
adapters' updates) that moves it by d |P(kept adapters) - P(left-out adapters)|, at most
d (max_k P_k - min_k P_k) with P_k an adapter alone (tests/test_aggregate.py checks twice that).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from components.mixture import MixtureModel
from components.model import TrunkOutput, pad_states
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
    def load(cls, folder: Path) -> AggregatorState:
        raw = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        return cls(raw["sample_ids"], raw["labels"], raw["embeddings"], {int(k): v for k, v in raw["predictions"].items()})

    def without(self, sample_ids: set[str]) -> AggregatorState:
        keep = torch.tensor([s not in sample_ids for s in self.sample_ids], dtype=torch.bool)
        return AggregatorState(
            [s for s in self.sample_ids if s not in sample_ids], self.labels[keep], self.embeddings[keep],
            {k: v[keep] for k, v in self.predictions.items()},
        )

    def shards(self) -> list[int]:
        return sorted(self.predictions)

    @property
    def lookup(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What apa_weights reads for every request: the unit-length keys [n, d], the labels [n] and
        the shards' predictions [K, n] (in shards() order), as float; computed once and kept while
        the state's tensors stay the same objects (a round replaces a shard's predictions)."""
        tensors = (self.embeddings, self.labels, *(self.predictions[k] for k in self.shards()))
        cached = self.__dict__.get("_lookup")  # (the tensors it was computed from, the lookup)
        if cached is None or len(cached[0]) != len(tensors) or any(a is not b for a, b in zip(cached[0], tensors)):
            keys = nn.functional.normalize(self.embeddings.float(), dim=-1)
            cached = self.__dict__["_lookup"] = (tensors, (keys, self.labels.float(), torch.stack(tensors[2:]).float()))
        return cached[1]


# --- weights --------------------------------------------------------------------------------------


def apa_weights(
    query: torch.Tensor, state: AggregatorState, neighbours: int, tau: float, masked: set[int] = frozenset()
) -> torch.Tensor:
    """The APA attention of each request over the shards, shape [batch, K] (K = state.shards())."""
    shards = state.shards()
    if not state.sample_ids:  # every validation sample forgotten: no evidence, equal weights
        return uniform_weights(len(query), shards, masked)
    keys, labels, predictions = state.lookup  # [n, d], [n], [K, n]
    similarity = nn.functional.normalize(query.float(), dim=-1) @ keys.T  # [b, n]
    nearest = similarity.topk(min(neighbours, len(state.sample_ids)), dim=-1).indices  # [b, m]
    error = (labels[nearest].unsqueeze(1) - predictions[:, nearest].transpose(0, 1)).abs().mean(-1)
    return masked_softmax(-tau * error, shards, masked)


def masked_softmax(logits: torch.Tensor, shards: list[int], masked: set[int]) -> torch.Tensor:
    if masked.isdisjoint(shards):  # nothing to mask: the same values, without building the mask per request
        return torch.softmax(logits, dim=-1)
    keep = torch.tensor([k not in masked for k in shards])
    if not keep.any():
        raise ValueError("every shard is masked: no adapter may serve")
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def uniform_weights(batch: int, shards: list[int], masked: set[int] = frozenset()) -> torch.Tensor:
    return masked_softmax(torch.zeros(batch, len(shards)), shards, masked)


@dataclass
class Selection:
    """The adapters each row mixes: `index` [batch, m] columns of the set's shards with their
    `weights` [batch, m] (index None: every shard, weights [batch, K]), and the APA weight mass
    `dropped` [batch] that the row left out."""

    index: torch.Tensor | None
    weights: torch.Tensor
    dropped: torch.Tensor

    def dense(self, shards: int) -> torch.Tensor:
        """The weights as [batch, K], zero where a shard is not mixed."""
        if self.index is None:
            return self.weights
        return torch.zeros(len(self.weights), shards, dtype=self.weights.dtype).scatter(1, self.index, self.weights)


def top_weights(weights: torch.Tensor, top_m: int | None = None, mass: float | None = None) -> Selection:
    """Per row of weights [batch, K]: the fewest largest weights that sum to at least `mass`, at
    most `top_m` of them, renormalised to sum to 1. Rows that keep fewer than the batch's most pad
    with zero weights. Where every row keeps all K (top_m >= K and mass 1 or None), the weights are
    returned untouched: the dense mixture, bit for bit."""
    k = weights.shape[1]
    m = min(top_m or k, k)
    by_mass = mass is not None and mass < 1
    if m == k and not by_mass:
        return Selection(None, weights, torch.zeros(len(weights), dtype=weights.dtype))
    ordered, index = weights.sort(dim=1, descending=True, stable=True)
    if not by_mass:  # top-m alone: every row keeps m
        kept = ordered[:, :m]
        return Selection(index[:, :m], kept / kept.sum(1, keepdim=True), ordered[:, m:].sum(1))
    keep = ordered.cumsum(1) - ordered < mass  # the mass of the larger ones is short of `mass`: keep it
    keep[:, m:] = False
    columns = int(keep.sum(1).max())
    if columns == k:
        return Selection(None, weights, torch.zeros(len(weights), dtype=weights.dtype))
    kept = ordered[:, :columns] * keep[:, :columns]
    return Selection(index[:, :columns], kept / kept.sum(1, keepdim=True), (ordered * ~keep).sum(1))


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


# --- the mixture of a set's adapters, and stored samples as its input ----------------------------


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


# --- the methods: one object each, one registry --------------------------------------------------


class Aggregation:
    """One aggregation method: the per-row shard weights [batch, K] of a batch, how the mixture
    turns them into P(yes), and what an adapter set must hold for it. Subclass and add to
    AGGREGATIONS to add a method (and to AggregateConfig.method's choices)."""

    name = ""
    decomposed = False  # the mixture's merge: (sum_k w_k B_k)(sum_k w_k A_k) instead of sum_k w_k B_k A_k
    sparse = False  # aggregate.top_m / weight_mass apply: the weights are APA's attention

    def check(self, version: str, shards: list[int], state: AggregatorState | None, partitioner) -> None:
        """Raise ValueError if adapter set `version` (of `shards`) lacks what the method needs."""

    def weights(self, config, mixture: MixtureModel, inputs: TrunkOutput, state: AggregatorState | None, partitioner,
                masked: set[int]) -> torch.Tensor:
        raise NotImplementedError

    def select(self, config, weights: torch.Tensor) -> Selection:
        """The adapters each row mixes: all of them, or (a sparse method under aggregate.top_m /
        weight_mass) the largest weights of each row."""
        if self.sparse and config.aggregate.sparse:
            return top_weights(weights, config.aggregate.top_m, config.aggregate.weight_mass)
        return Selection(None, weights, torch.zeros(len(weights)))

    def p_yes(self, mixture: MixtureModel, inputs: TrunkOutput, chosen: Selection, masked: set[int]) -> torch.Tensor:
        return mixture.p_yes(inputs, chosen.weights, decomposed=self.decomposed, index=chosen.index)


class Attention(Aggregation):
    """APA: attention over the shards (apa_weights), non-decomposed parameter-level merge."""

    name, sparse = "attention", True

    def check(self, version, shards, state, partitioner):
        if state is None or state.shards() != shards:
            raise ValueError(f"adapter set {version}: aggregation {self.name!r} needs the aggregator state of "
                             f"shards {shards}, found {None if state is None else state.shards()}")

    def weights(self, config, mixture, inputs, state, partitioner, masked):
        if state is None or state.shards() != mixture.shards:
            raise ValueError(f"the aggregator state covers shards {None if state is None else state.shards()}, "
                             f"the adapters are {mixture.shards}")
        return apa_weights(inputs.embedding, state, config.aggregate.neighbours, config.aggregate.tau, masked)


class Decomposed(Attention):
    """APA's attention with the decomposed merge: (sum_k w_k B_k)(sum_k w_k A_k)."""

    name, decomposed = "decomposed", True


class Uniform(Aggregation):
    """Equal weights over the unmasked shards, one merged forward (parameter averaging)."""

    name = "uniform"

    def weights(self, config, mixture, inputs, state, partitioner, masked):
        return uniform_weights(len(inputs), mixture.shards, masked)


class Average(Uniform):
    """SISA: K head passes, one per unmasked adapter, and the mean of their P(yes)."""

    name = "average"

    def p_yes(self, mixture, inputs, chosen, masked):
        return mixture.p_yes_averaged(inputs, masked)


class Routing(Aggregation):
    """LMEraser: all weight on the shard of the nearest public prototype."""

    name = "routing"

    def check(self, version, shards, state, partitioner):
        if partitioner is None or partitioner.centroids is None:
            raise ValueError(f"adapter set {version}: routing needs the public semantic/adaptive partitioner")

    def weights(self, config, mixture, inputs, state, partitioner, masked):
        if partitioner is None or partitioner.centroids is None:
            raise ValueError(f"routing needs a semantic or adaptive partitioner (this one is {getattr(partitioner, 'method', None)!r})")
        return routing_weights(partitioner.ranking(inputs.embedding.numpy()), mixture.shards, masked)


AGGREGATIONS: dict[str, Aggregation] = {m.name: m for m in (Attention(), Decomposed(), Uniform(), Average(), Routing())}


def aggregation(name: str) -> Aggregation:
    """The method object named `name` (config.aggregate.method's values)."""
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}: choose from {', '.join(AGGREGATIONS)}") from None


# --- one entry point for every method: serving, evaluation and verification use it -------------


def mixture_weights(config, mixture: MixtureModel, inputs: TrunkOutput, state: AggregatorState | None, partitioner,
                    masked: set[int] = frozenset(), method: str | None = None) -> torch.Tensor:
    """The per-row shard weights [batch, K] of `method` (default config.aggregate.method)."""
    return aggregation(method or config.aggregate.method).weights(config, mixture, inputs, state, partitioner, masked)


class Scored(NamedTuple):
    p_yes: np.ndarray  # [n]
    weights: np.ndarray  # [n, K]: the weights each row was mixed with (a sparse mixture's renormalised, 0 if left out)
    dropped: np.ndarray  # [n]: the APA weight mass a sparse mixture left out (0: dense)


@torch.no_grad()
def predict(config, mixture: MixtureModel, batches: Iterable[TrunkOutput], state: AggregatorState | None, partitioner,
            masked: set[int] = frozenset(), method: str | None = None) -> Scored:
    """P(yes), the shard weights and the weight mass left out of every row of `batches` (trunk
    outputs: of prompts, from `MixtureModel.encode`, or of stored samples, from `stored_inputs`)
    under an aggregation method."""
    strategy = aggregation(method or config.aggregate.method)
    scores, weights, dropped = [], [], []
    for inputs in batches:
        chosen = strategy.select(config, strategy.weights(config, mixture, inputs, state, partitioner, masked))
        scores.append(strategy.p_yes(mixture, inputs, chosen, masked))
        weights.append(chosen.dense(len(mixture.shards)))
        dropped.append(chosen.dropped)
    if not scores:
        return Scored(np.zeros(0), np.zeros((0, len(mixture.shards))), np.zeros(0))
    return Scored(torch.cat(scores).numpy(), torch.cat(weights).numpy(), torch.cat(dropped).numpy())


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

    def predict(self, config, prompts: list[str], masked: set[int] = frozenset()) -> Scored:
        """P(yes) [n], shard weights [n, K] and weight mass left out [n] of prompts scored together:
        one pass of the trunk (the attention's embedding and the head's input), one of the head."""
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
    aggregation(method).check(adapter_set.version, sorted(adapters), state, partitioner)
    from components.model import load_base_model

    base = load_base_model(config.model, config.seed, tokenizer)
    mixture = MixtureModel(base, tokenizer, adapters, config.adapter.alpha / config.adapter.r, config.model)
    return ServedSet(str(adapter_set.version), shards, mixture, state, partitioner, method)


def served_mask(registry_mask: set[int], current_mask: set[int], loaded_pins: dict[int, str],
                live_pins: dict[int, str] | None) -> set[int]:
    """The shards a server must not use. The registry's mask, plus every shard this server has
    masked whose loaded version is not the live one: a forget job unmasks a shard once its clean
    version is live, and the old version in memory must stay masked until the new set is loaded.
    Plus every loaded shard the live set no longer holds: a forget that empties a shard leaves it
    out of the set (an empty set, when every shard's data is forgotten), and its old version,
    purged from the registry, must not serve while (or because) no new set can be loaded.
    `live_pins` None (unknown) counts every loaded shard as stale."""
    stale = {k for k, v in loaded_pins.items() if live_pins is None or str(live_pins.get(k)) != str(v)}
    dropped = set(loaded_pins) - set(live_pins) if live_pins is not None else set()
    return set(registry_mask) | (stale & set(current_mask)) | dropped


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
