"""The one architecture table: where MEMIT edits each supported model type, and how its names map.

MEMIT edits the MLP down-projection (d_ff -> d_model) of chosen layers. nn.Linear stores it as
(d_model, d_ff); GPT-2's Conv1D as (d_ff, d_model), hence `conv1d` (the checkpoint layout).
Adding an architecture is one entry here plus its tiny test model (memit_vllm.testing): the editor,
the patch checks, the vLLM loader and export-lora all read this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import MemitError


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    hf_class: str  # config.json's architectures[0] / the transformers causal-LM class
    layers: str  # attribute path of the decoder layer list, e.g. "model.layers"
    down_proj: str  # path of the down-projection inside one layer, e.g. "mlp.down_proj"
    conv1d: bool = False  # stored (d_ff, d_model) in the checkpoint (GPT-2's Conv1D)
    vllm_lora: bool = False  # vLLM serves a LoRA on this down-projection (--memit-variant, export-lora)
    # How the down-projection's output reaches the residual stream, where MEMIT's residuals are measured
    # (default: added as it is): a norm in between (Gemma's post-MLP norm), a layer attribute scaling the
    # MLP output (Granite's residual multiplier), a layer attribute scaling the layer's whole output (Gemma 4).
    post_mlp_norm: str | None = None
    mlp_scale: str | None = None
    stream_scale: str | None = None

    def module_name(self, layer: int) -> str:
        """The down-projection's module path in the transformers model."""
        return f"{self.layers}.{layer}.{self.down_proj}"

    def weight_name(self, layer: int) -> str:
        """The down-projection weight's checkpoint key (with the base-model prefix)."""
        return f"{self.module_name(layer)}.weight"

    @cached_property
    def _weight_pattern(self) -> re.Pattern:
        # Checkpoints may omit the base-model prefix (original GPT-2: "h.3.mlp.c_proj.weight"); vLLM
        # module names may carry another one: match the suffix from the layer list's last part.
        tail = self.layers.rsplit(".", 1)[-1]
        return re.compile(rf"(?:^|\.){re.escape(tail)}\.(\d+)\.{re.escape(self.down_proj)}\.weight$")

    def layer_of(self, name: str) -> int | None:
        """The layer index of a down-projection weight name (prefixed or not), None for any other name."""
        m = self._weight_pattern.search(name)
        return int(m.group(1)) if m else None

    def checkpoint_name(self, layer: int, keys) -> str:
        """The key under which `keys` (a checkpoint's weight names) holds layer `layer`'s down-projection."""
        name = self.weight_name(layer)
        if name in keys:
            return name
        matches = [k for k in keys if name.endswith("." + k)]
        if len(matches) != 1:
            raise MemitError(f"cannot find the checkpoint weight for {name!r} (candidates: {matches or 'none'})")
        return matches[0]


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", "model.layers", "mlp.down_proj", vllm_lora=True),
    Architecture("qwen2", "Qwen2ForCausalLM", "model.layers", "mlp.down_proj", vllm_lora=True),
    Architecture("mistral", "MistralForCausalLM", "model.layers", "mlp.down_proj", vllm_lora=True),
    Architecture("gpt2", "GPT2LMHeadModel", "transformer.h", "mlp.c_proj", conv1d=True),
    Architecture("gptj", "GPTJForCausalLM", "transformer.h", "mlp.fc_out"),
    Architecture("gpt_neox", "GPTNeoXForCausalLM", "gpt_neox.layers", "mlp.dense_4h_to_h"),
    Architecture("qwen3", "Qwen3ForCausalLM", "model.layers", "mlp.down_proj"),
    Architecture("qwen3_5_text", "Qwen3_5ForCausalLM", "model.layers", "mlp.down_proj"),
    Architecture("gemma3_text", "Gemma3ForCausalLM", "model.layers", "mlp.down_proj",
                 post_mlp_norm="post_feedforward_layernorm"),
    Architecture("gemma4_text", "Gemma4ForCausalLM", "model.layers", "mlp.down_proj",
                 post_mlp_norm="post_feedforward_layernorm", stream_scale="layer_scalar"),
    Architecture("phi3", "Phi3ForCausalLM", "model.layers", "mlp.down_proj"),  # Phi-3 and Phi-4
    Architecture("granite", "GraniteForCausalLM", "model.layers", "mlp.down_proj", mlp_scale="residual_multiplier"),
    Architecture("ministral3", "Ministral3ForCausalLM", "model.layers", "mlp.down_proj"),
)}


# Mixture-of-experts model types: each layer has one down-projection per expert, and MEMIT solves for one.
MOE_MODEL_TYPES = frozenset({
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "qwen3_omni_moe",
    "llama4", "llama4_text", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe", "granitemoeshared",
    "granitemoehybrid", "olmoe", "dbrx", "gpt_oss", "jamba", "minimax", "glm4_moe", "ernie4_5_moe",
    "hunyuan_v1_moe", "dots1", "jetmoe",
})
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # config keys, by model family


def _supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _refuse_moe(model_type: str) -> None:
    raise MemitError(f"architecture {model_type!r} is not supported: it is a mixture-of-experts model, whose MLP "
                     "down-projections are per expert (MEMIT edits one dense down-projection per layer); supported "
                     f"model types: {_supported()}")


def by_model_type(model_type: str) -> Architecture:
    if model_type in MOE_MODEL_TYPES:
        _refuse_moe(model_type)
    if model_type not in ARCHITECTURES:
        raise MemitError(f"architecture {model_type!r} is not supported; supported model types: {_supported()}")
    return ARCHITECTURES[model_type]


def by_config(config: dict) -> Architecture:
    """The entry for a checkpoint's config.json; also refuses the experts of a model type that has dense
    and mixture-of-experts variants (Gemma 4's `enable_moe_block`)."""
    model_type = config.get("model_type", "?")
    if config.get("enable_moe_block") or any((config.get(k) or 0) > 1 for k in _EXPERT_COUNTS):
        _refuse_moe(model_type)
    return by_model_type(model_type)


def by_class(hf_class: str) -> Architecture:
    """The entry for a transformers class name as patches record it (`base.architecture`)."""
    for arch in ARCHITECTURES.values():
        if arch.hf_class == hf_class:
            return arch
    raise MemitError(f"architecture {hf_class!r} is not supported; supported: "
                     f"{', '.join(sorted(a.hf_class for a in ARCHITECTURES.values()))}")


def lora_classes() -> list[str]:
    """The classes whose patches vLLM can serve as down-projection LoRA adapters."""
    return sorted(a.hf_class for a in ARCHITECTURES.values() if a.vllm_lora)
