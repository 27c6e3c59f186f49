"""The decoder-only families the platform runs, and the little that differs between them.

Every family here is a pre-norm decoder whose layers hold `self_attn` (q/k/v/o projections with
rotary positions), `input_layernorm`, `post_attention_layernorm` and `mlp`, under a
`model.embed_tokens` / `model.layers` / `model.norm` / `lm_head` causal LM: components.model cuts
any of them into a frozen trunk and a trained head. What varies is in `Family`; a family whose
top layer cannot run at the answer position alone runs it whole (the same P(yes), more compute).
Reading a folder's architecture needs its config.json only, so a config is checked without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    lora_targets: tuple[str, ...]  # adapter.target_modules when the config names none
    # The head's top layer may run at the answer position only (components.model.answer_position_layer):
    # attention whose queries and keys are the projections alone, with rotary positions.
    answer_position: bool


TALLREC_TARGETS = ("q_proj", "v_proj")  # TALLRec's LoRA: the query and value projections
FAMILIES = {
    "llama": Family(TALLREC_TARGETS, answer_position=True),
    "mistral": Family(TALLREC_TARGETS, answer_position=True),
    "qwen2": Family(TALLREC_TARGETS, answer_position=True),
    "gemma": Family(TALLREC_TARGETS, answer_position=True),  # its embedding scale lives in embed_tokens
    "qwen3": Family(TALLREC_TARGETS, answer_position=False),  # RMS-normed queries and keys (q_norm, k_norm)
}


def model_type_of(folder: str | Path) -> str:
    """The architecture of a Hugging Face model folder, if the platform runs it; else ValueError
    naming what is wrong."""
    config_file = Path(folder).expanduser() / "config.json"
    if not config_file.exists():
        raise ValueError(f"model.path {folder}: no config.json there (a Hugging Face model folder: config.json, "
                         "weights, tokenizer files)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"model.path {folder}: config.json is not a JSON object") from None
    if model_type not in FAMILIES:
        raise ValueError(f"model.path {folder}: architecture {model_type!r} is not supported: the platform splits "
                         f"{', '.join(sorted(FAMILIES))} into trunk and head")
    return model_type


def family_of(model_config) -> Family:
    """The family of a loaded model, from its transformers config."""
    model_type = model_config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"architecture {model_type!r} is not supported ({', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


def lora_targets(adapter_config, model) -> list[str]:
    """The linear layers LoRA adapts: the config's, or the family's default."""
    return list(adapter_config.target_modules or family_of(model.config).lora_targets)


def sliding_window(model_config, layer_index: int) -> int | None:
    """The attention window of a decoder layer (None: it sees the whole prompt)."""
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types is not None:
        return model_config.sliding_window if layer_types[layer_index] == "sliding_attention" else None
    return getattr(model_config, "sliding_window", None)
