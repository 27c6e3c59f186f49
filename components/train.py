"""Train one shard's adapter, slice by slice, deterministically on CPU.

SISA slicing: the shard's samples fall into R slices (a hash of the sample id). Stage r trains on
slices 0..r (`cumulative`, as in SISA) or on slice r alone (`incremental`), continuing from the
checkpoint of stage r-1, and writes checkpoint r (adapter, optimizer, RNG state and the manifest
of the slices it saw). Forgetting a sample of slice s restarts from checkpoint s-1; a stage's
result depends only on its own slices and the shard's seed, so resuming equals training straight
through, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from components.architectures import lora_targets
from components.checkpoints import SliceCheckpoints
from components.config import Config
from components.data import stable_hash
from components.model import answer_token_ids, decoder_of, head_logits, p_yes, pad_states

ADAPTER_FILE = "adapter.pt"


def shard_seed(seed: int, shard: int) -> int:
    return stable_hash("shard-seed", seed, shard) % (2**31)


def manifest_sha256(sample_ids) -> str:
    """Identifies a set of samples without storing their ids."""
    return hashlib.sha256("\n".join(sorted(map(str, sample_ids))).encode()).hexdigest()


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def lora_config(config: Config, base: nn.Module) -> LoraConfig:
    """TALLRec's LoRA, in the head's layers only: the trunk below them is shared and frozen."""
    a, trunk = config.adapter, config.model.trunk_layers
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                      target_modules=lora_targets(a, base), bias="none",
                      layers_to_transform=list(range(trunk, len(decoder_of(base).layers))) if trunk else None)


class AdaptedHead(nn.Module):
    """The frozen base model with one shard's adapter, run over trunk states: LoRA in the head's
    layers (peft), or LMEraser's soft prompt prepended at the trunk boundary. The adapter's
    initial values are fixed by the shard's seed."""

    def __init__(self, config: Config, shard: int, base: nn.Module):
        super().__init__()
        self.model_config = config.model
        if config.train.gradient_checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(shard_seed(config.seed, shard))
        if config.adapter.kind == "lora":
            self.model, self.prompt = get_peft_model(base, lora_config(config, base)), None
        else:
            self.model = base
            # Scaled like the model's own token embeddings (public: the base model), not like user data.
            scale = decoder_of(base).embed_tokens.weight.std().item()
            self.prompt = nn.Parameter(torch.randn(config.adapter.num_virtual_tokens, base.config.hidden_size) * scale)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def logits(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        prompt = None if self.prompt is None else self.prompt.unsqueeze(0).expand(len(states), -1, -1)
        return head_logits(self.model, states, mask, self.model_config, prompt)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors, under the names the mixture (components.aggregate) reads."""
        if self.prompt is not None:
            return {"prompt_embeddings": self.prompt.detach().cpu().clone()}
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.prompt is not None:
            with torch.no_grad():
                self.prompt.copy_(state["prompt_embeddings"])
        else:
            set_peft_model_state_dict(self.model, state)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def answer_loss(logits: torch.Tensor, labels: list[int], yes_id: int, no_id: int, kind: str) -> torch.Tensor:
    """TALLRec's loss on the answer token over the whole vocabulary, or a two-way loss over the
    " Yes" / " No" logits alone (the score only ever compares those two)."""
    if kind == "two-way":
        targets = torch.tensor([0 if label else 1 for label in labels], device=logits.device)
        return nn.functional.cross_entropy(logits[:, [yes_id, no_id]], targets)
    targets = torch.tensor([yes_id if label else no_id for label in labels], device=logits.device)
    return nn.functional.cross_entropy(logits, targets)


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def learning_rate(config: Config) -> float:
    """The rate the adapter trains at: a soft prompt's own where the config sets one."""
    if config.adapter.kind == "prompt" and config.train.prompt_learning_rate is not None:
        return config.train.prompt_learning_rate
    return config.train.learning_rate


def training_sha256(config: Config) -> str:
    """What a checkpoint's bits depend on besides the data: model, adapter, training, seed."""
    train = config.train.model_dump(mode="json", exclude={"cpus_per_actor", "retrain_cpus", "gpus_per_actor", "max_restarts",
                                                          "prompt_learning_rate", "max_concurrent_shards", "storage"})
    relevant = {"seed": config.seed, "model": config.model.model_dump(mode="json"), "adapter": config.adapter.model_dump(mode="json"),
                "train": {**train, "learning_rate": learning_rate(config)}, "num_slices": config.partition.num_slices}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def stage_manifests(slices: list[list[str]], config: Config) -> list[str]:
    """One fingerprint per stage: the slice's sample ids and the training configuration."""
    training = training_sha256(config)
    return [hashlib.sha256((training + manifest_sha256(s)).encode()).hexdigest() for s in slices]


def last_clean_stage(checkpoints: SliceCheckpoints, slices: list[list[str]], config: Config) -> int:
    """The latest stage whose checkpoint was trained on exactly the current slices 0..r with the
    same training configuration; -1 if none."""
    manifests = stage_manifests(slices, config)
    clean = -1
    for stage in range(len(slices)):
        saved = checkpoints.read(stage)
        if saved is None or saved["manifests"] != manifests[: stage + 1]:
            break
        clean = stage
    return clean


def shard_steps(config: Config, slice_sizes: list[int]) -> int:
    """How many optimizer steps training a shard from scratch takes (its losses' length at the end),
    given its samples per slice: what a progress bar counts towards."""
    stages = [sum(slice_sizes[: r + 1]) if config.train.slice_mode == "cumulative" else slice_sizes[r]
              for r in range(len(slice_sizes))]
    return config.train.epochs * sum(-(-n // config.train.batch_size) for n in stages)


@dataclass
class ShardResult:
    shard: int
    adapter: dict[str, torch.Tensor]
    valid_predictions: np.ndarray
    samples: int
    manifest_sha256: str
    adapter_sha256: str
    restarted_from: int  # first stage trained in this call (0 = from scratch, R = nothing to train)
    losses: list[float] = field(default_factory=list)  # every step's loss, all stages
    seconds: float = 0.0


def train_shard(
    config: Config,
    shard: int,
    samples: pd.DataFrame,
    valid: pd.DataFrame,
    checkpoints: SliceCheckpoints,
    base: nn.Module,
    tokenizer,
    states_of: Callable[[pd.DataFrame], list[torch.Tensor]],
    progress: Callable[[dict], None] | None = None,
    after_epoch: Callable[[AdaptedHead, int, int], None] | None = None,
    save_checkpoint: Callable[[dict | None, int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ShardResult:
    """Train (or resume) one shard's adapter on `base` (frozen; the trunk may be dropped).
    `samples` carries sample_id, label and slice; `states_of(rows)` gives the rows' trunk states.
    `after_epoch(model, stage, epoch)` may look at the model (e.g. score validation samples).
    `save_checkpoint(state, stage)` stores a stage's checkpoint (default: `checkpoints.write`);
    every rank calls it, rank 0 with the state, the others with None.
    With `world_size` > 1 (torch.distributed initialised), rank r takes rows r, r+W, ... of every
    batch and the gradients are summed across ranks: the full batch's gradient, in a fixed order."""
    started = time.time()
    samples = samples.sort_values("sample_id").reset_index(drop=True)
    num_slices = config.partition.num_slices
    slices = [samples.loc[samples["slice"] == r, "sample_id"].tolist() for r in range(num_slices)]
    manifests = stage_manifests(slices, config)
    yes_id, no_id = answer_token_ids(tokenizer, config.model)

    model = _on_device(AdaptedHead(config, shard, base), config)
    optimizer = torch.optim.AdamW(model.trainable(), lr=learning_rate(config), weight_decay=config.train.weight_decay)
    resume = last_clean_stage(checkpoints, slices, config)
    losses = _resume(model, optimizer, checkpoints, resume, rank)
    if rank == 0:
        for stale in range(resume + 1, num_slices):  # checkpoints of other data must not survive
            checkpoints.remove(stale)

    def step(rows: pd.DataFrame) -> float:
        optimizer.zero_grad(set_to_none=True)
        if world_size == 1:
            loss = answer_loss(model.logits(*pad_states(states_of(rows))), rows["label"].tolist(), yes_id, no_id, config.train.loss)
            loss.backward()
        else:
            loss = data_parallel_backward(model, rows, states_of, rank, world_size, yes_id, no_id, config.train.loss)
        optimizer.step()
        return float(loss.detach())

    by_id, seed = samples.set_index("sample_id"), shard_seed(config.seed, shard)
    model.train()
    for stage in range(resume + 1, num_slices):
        stage_ids = sorted(sum(slices[: stage + 1], []) if config.train.slice_mode == "cumulative" else slices[stage])
        for epoch in range(config.train.epochs):
            order = torch.randperm(len(stage_ids), generator=torch.Generator().manual_seed(stable_hash(seed, stage, epoch) % 2**63))
            for start in range(0, len(stage_ids), config.train.batch_size):
                rows = by_id.loc[[stage_ids[i] for i in order[start : start + config.train.batch_size].tolist()]].reset_index()
                losses.append(step(rows))
                if progress:
                    progress({"shard": shard, "stage": stage, "epoch": epoch, "step": len(losses), "loss": losses[-1]})
            if after_epoch:
                after_epoch(model, stage, epoch)
                model.train()
        rngs = gathered(torch.get_rng_state(), world_size)  # a collective: every rank takes part
        state = _checkpoint_state(model, optimizer, losses, manifests[: stage + 1], rngs) if rank == 0 else None
        if save_checkpoint:
            save_checkpoint(state, stage)
        elif state is not None:
            checkpoints.write(state, stage)
        if progress:
            progress({"shard": shard, "stage": stage, "checkpoint": True, "step": len(losses)})

    adapter = model.adapter_state()
    valid_predictions = predict_states(model, states_of(valid), yes_id, no_id) if rank == 0 else np.zeros(0, np.float32)
    return ShardResult(
        shard=shard,
        adapter=adapter,
        valid_predictions=valid_predictions,
        samples=len(samples),
        manifest_sha256=manifest_sha256(samples["sample_id"]),
        adapter_sha256=tensors_sha256(adapter),
        restarted_from=resume + 1,
        losses=losses,
        seconds=time.time() - started,
    )


def _on_device(model: AdaptedHead, config: Config) -> AdaptedHead:
    """On the GPU where the worker was given (a fraction of) one: never on the CPU unnoticed."""
    if config.train.gpus_per_actor > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.gpus_per_actor is {config.train.gpus_per_actor:g} but torch {torch.__version__} sees no "
                               f"CUDA device on this node ({'a CPU-only build' if torch.version.cuda is None else 'no GPU or driver'}):"
                               " run the CUDA image there, or set train.gpus_per_actor: 0")
        model.to("cuda")
    return model


def _resume(model: AdaptedHead, optimizer, checkpoints: SliceCheckpoints, resume: int, rank: int) -> list[float]:
    """Load checkpoint `resume` (none where it is -1) into the model, the optimizer and this rank's
    random state, so that dropout continues as if never interrupted; returns the losses so far."""
    if resume < 0:
        return []
    state = checkpoints.read(resume)
    model.load_adapter_state(state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_by_rank"][rank])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return list(state["losses"])


def _checkpoint_state(model: AdaptedHead, optimizer, losses: list[float], manifests: list, rngs: list) -> dict:
    """A stage's checkpoint (rank 0): the adapter, the optimizer, every rank's random state."""
    return {
        "adapter": model.adapter_state(),
        "optimizer": optimizer.state_dict(),
        "rng_by_rank": rngs,
        "cuda_rng": torch.cuda.get_rng_state() if model.device.type == "cuda" else None,
        "losses": losses,
        "manifests": manifests,
    }


def data_parallel_backward(model: AdaptedHead, rows: pd.DataFrame, states_of, rank: int, world_size: int,
                           yes_id: int, no_id: int, kind: str) -> torch.Tensor:
    """This rank's share of a batch's mean loss, backpropagated, the gradients summed over ranks
    (a rank whose share is empty adds zeros). Returns the batch's loss."""
    mine = rows.iloc[rank::world_size]
    loss = torch.zeros(())
    if len(mine):
        loss = answer_loss(model.logits(*pad_states(states_of(mine))), mine["label"].tolist(), yes_id, no_id, kind)
        loss = loss * (len(mine) / len(rows))
        loss.backward()
    for param in model.trainable():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def gathered(value, world_size: int) -> list:
    """`value` from every rank, by rank (the value itself when training alone)."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    return values


def predict_states(model: AdaptedHead, states: list[torch.Tensor], yes_id: int, no_id: int) -> np.ndarray:
    """P(yes) of samples given their trunk states, one sample at a time: a cached prediction never
    depends on which other samples were scored with it."""
    model.eval()
    with torch.no_grad():
        return np.array([float(p_yes(model.logits(*pad_states([s])), yes_id, no_id)[0]) for s in states], dtype=np.float32)


def checkpoint_result(config: Config, shard: int, samples: pd.DataFrame, valid_states: list[torch.Tensor],
                      checkpoints: SliceCheckpoints, base: nn.Module, tokenizer) -> ShardResult | None:
    """The shard as its last clean slice checkpoint left it, with that adapter's validation
    predictions (the pass training ends with); None where no checkpoint is clean. Clean means its
    manifest names exactly the current slices 0..c: in either slice mode it has seen those and
    nothing else, so a sample deleted from the store is in none of them. `base` is wrapped by the
    adapter: give each shard its own."""
    samples = samples.sort_values("sample_id")
    slices = [samples.loc[samples["slice"] == r, "sample_id"].tolist() for r in range(config.partition.num_slices)]
    stage = last_clean_stage(checkpoints, slices, config)
    if stage < 0:
        return None
    saved = checkpoints.read(stage)
    model = AdaptedHead(config, shard, base)
    model.load_adapter_state(saved["adapter"])
    seen = sum(slices[: stage + 1], [])
    return ShardResult(shard=shard, adapter=saved["adapter"], samples=len(seen), manifest_sha256=manifest_sha256(seen),
                       valid_predictions=predict_states(model, valid_states, *answer_token_ids(tokenizer, config.model)),
                       adapter_sha256=tensors_sha256(saved["adapter"]), restarted_from=stage + 1, losses=list(saved["losses"]))


def save_shard_result(result: ShardResult, folder: Path, config: Config) -> Path:
    """The adapter folder that the registry versions. Per-sample validation predictions are not in
    it: they belong to the aggregator state, which forgetting rewrites."""
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic(result.adapter, folder / ADAPTER_FILE)
    meta = {
        "shard": result.shard, "samples": result.samples, "manifest_sha256": result.manifest_sha256,
        "adapter_sha256": result.adapter_sha256, "restarted_from": result.restarted_from,
        "seconds": round(result.seconds, 3), "adapter": config.adapter.model_dump(mode="json"),
        "losses": result.losses,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder
