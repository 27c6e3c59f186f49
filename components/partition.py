"""Shards and slices, each a pure function of the sample and public state.

Public state is the base model, the item catalogue, the config and its seed. The semantic and
adaptive partitioners are fitted on *public reference prompts* synthesized from the catalogue,
never on private samples; a private sample then goes to its nearest centroid. So deleting one
sample can never move another sample to a different shard or slice.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import DEFAULT_PROMPT, PartitionConfig
from components.data import build_prompt, stable_hash


def reference_prompts(items: pd.DataFrame, size: int, history_len: int, seed: int, template: str = DEFAULT_PROMPT) -> list[str]:
    """Synthetic prompts (data.prompt) from the catalogue: a seeded "taste" (a genre) picks the liked
    titles, the rest of the catalogue the disliked ones. No user data is involved."""
    rng = np.random.default_rng(seed)
    titles = items["title"].to_numpy()
    genre_lists = items["genres"].fillna("").str.split()
    genres = sorted({g for gs in genre_lists for g in gs}) or [""]
    prompts = []
    for _ in range(size):
        taste = genres[rng.integers(len(genres))]
        in_taste = np.array([taste in gs for gs in genre_lists]) if taste else np.ones(len(titles), bool)
        n_liked = int(rng.integers(0, history_len + 1))
        liked_pool = np.flatnonzero(in_taste) if in_taste.any() else np.arange(len(titles))
        disliked_pool = np.flatnonzero(~in_taste) if (~in_taste).any() else np.arange(len(titles))
        liked = titles[rng.choice(liked_pool, size=n_liked)].tolist()
        disliked = titles[rng.choice(disliked_pool, size=history_len - n_liked)].tolist()
        target = titles[rng.integers(len(titles))]
        prompts.append(build_prompt(liked, disliked, target, template))
    return prompts


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def balanced_kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 50) -> np.ndarray:
    """Spherical k-means whose clusters are equal in size (capacity ceil(n/k)) on the points it is
    fitted on. Only ever fitted on public reference embeddings."""
    n = len(points)
    if n < k:
        raise ValueError(f"partition.reference_size ({n}) must be at least partition.num_shards ({k})")
    rng = np.random.default_rng(seed)
    centroids = points[rng.choice(n, size=k, replace=False)]
    capacity = -(-n // k)
    assignment = np.full(n, -1)
    for _ in range(iterations):
        similarity = points @ centroids.T
        new = np.full(n, -1)
        load = np.zeros(k, int)
        for flat in np.argsort(-similarity, axis=None, kind="stable"):
            point, cluster = divmod(int(flat), k)
            if new[point] < 0 and load[cluster] < capacity:
                new[point], load[cluster] = cluster, load[cluster] + 1
        if np.array_equal(new, assignment):
            break
        assignment = new
        centroids = _unit(np.stack([points[assignment == c].mean(0) for c in range(k)]))
    return centroids


def adaptive_prototypes(points: np.ndarray, distance_threshold: float, min_cluster_size: int) -> np.ndarray:
    """LMEraser: agglomerative clustering with a distance threshold, so the number of clusters
    follows the diversity of the data; clusters too small to train on join their nearest one."""
    # Imported here: every process that reads the store imports this module, few of them partition.
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(
        n_clusters=None, distance_threshold=distance_threshold, metric="cosine", linkage="average"
    ).fit_predict(points)
    clusters = [points[labels == c] for c in range(labels.max() + 1)]
    while len(clusters) > 1:
        sizes = [len(c) for c in clusters]
        smallest = int(np.argmin(sizes))
        if sizes[smallest] >= min_cluster_size:
            break
        protos = _unit(np.stack([c.mean(0) for c in clusters]))
        similarity = protos @ protos[smallest]
        similarity[smallest] = -np.inf
        target = int(np.argmax(similarity))
        clusters[target] = np.concatenate([clusters[target], clusters[smallest]])
        del clusters[smallest]
    clusters.sort(key=len, reverse=True)
    return _unit(np.stack([c.mean(0) for c in clusters]))


@dataclass(frozen=True)
class Partitioner:
    """Maps a sample to its shard. `center` and `centroids` are public (fitted on the reference set)."""

    method: str
    num_shards: int
    seed: int
    center: np.ndarray | None = None
    centroids: np.ndarray | None = None

    @classmethod
    def fit(cls, config: PartitionConfig, seed: int, reference_embeddings: np.ndarray | None) -> Partitioner:
        if config.method in ("random", "user"):
            return cls(config.method, config.num_shards, seed)
        center = reference_embeddings.mean(0)
        points = _unit(reference_embeddings - center)
        if config.method in ("semantic", "semantic-user"):
            centroids = balanced_kmeans(points, config.num_shards, seed)
        else:
            centroids = adaptive_prototypes(points, config.distance_threshold, config.min_cluster_size)
        return cls(config.method, len(centroids), seed, center, centroids)

    def assign(self, samples: pd.DataFrame, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Shard of each sample; for semantic/adaptive the nearest centroid of its embedding, for
        semantic-user the nearest centroid of its user's mean embedding."""
        if self.method == "random":
            return np.array([stable_hash("shard", self.seed, s) % self.num_shards for s in samples["sample_id"]], dtype=int)
        if self.method == "user":
            return np.array([stable_hash("shard", self.seed, u) % self.num_shards for u in samples["user_id"]], dtype=int)
        if self.method == "semantic-user":
            return self.nearest(user_mean_embeddings(samples, embeddings))
        return self.nearest(embeddings)

    def nearest(self, embeddings: np.ndarray) -> np.ndarray:
        return self.ranking(embeddings)[:, 0]

    def ranking(self, embeddings: np.ndarray) -> np.ndarray:
        """Shards of each embedding from nearest to farthest centroid, shape [n, K]."""
        similarity = _unit(np.asarray(embeddings) - self.center) @ self.centroids.T
        return np.argsort(-similarity, axis=1, kind="stable")

    def save(self, path: Path) -> None:
        arrays = {} if self.centroids is None else {"center": self.center, "centroids": self.centroids}
        np.savez(path, meta=json.dumps({"method": self.method, "num_shards": self.num_shards, "seed": self.seed}), **arrays)

    @classmethod
    def load(cls, path: Path) -> Partitioner:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            return cls(meta["method"], meta["num_shards"], meta["seed"], f.get("center"), f.get("centroids"))


def user_mean_embeddings(samples: pd.DataFrame, embeddings: np.ndarray) -> np.ndarray:
    """Each row's user's mean embedding, summed in sample-id order: it depends on that user's
    samples alone, never on the frame's order or on other users."""
    users = samples["user_id"].astype(str).to_numpy()
    ids = samples["sample_id"].astype(str).to_numpy()
    means = {}
    for user in np.unique(users):
        rows = np.flatnonzero(users == user)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        means[user] = np.asarray(embeddings)[rows].astype(np.float64).mean(0)
    return np.stack([means[u] for u in users])


def slice_of(user_ids, num_slices: int, seed: int) -> np.ndarray:
    """A sample's slice inside its shard: a hash of its user's id mod R. A user's samples share a
    slice, so forgetting a user, or an interaction (which only that user's samples contain),
    restarts each affected shard from one slice, not from the earliest of several."""
    return np.array([stable_hash("slice", seed, u) % num_slices for u in user_ids], dtype=int)


def shard_sizes_report(shards: np.ndarray, num_shards: int) -> dict[int, int]:
    sizes = {k: int((shards == k).sum()) for k in range(num_shards)}
    smallest, largest = min(sizes.values()), max(sizes.values())
    if largest > 2 * max(smallest, 1):
        warnings.warn(f"unbalanced shards: largest {largest} samples, smallest {smallest} ({sizes})", stacklevel=2)
    return sizes
