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
)}


def _supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def by_model_type(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise MemitError(f"architecture {model_type!r} is not supported; supported model types: {_supported()}")
    return ARCHITECTURES[model_type]


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
