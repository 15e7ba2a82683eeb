"""Every use the editor makes of framework internals, in one place, with the versions it was tested on.

The editor reads and short-circuits a transformers model in ways its public API does not promise:
- decoder layers return a bare hidden-state tensor or a tuple that starts with it (by architecture and
  release), and take the hidden states as their first argument or as `hidden_states=`;
- `resume_after` replaces the `forward` of layer instances for the length of a block (restoring accelerate's
  wrapper on a dispatched model; accelerate's own internals are used in editor/offload.py);
- `PrefixCache` rewrites the rows of a `DynamicCache` (`past_key_values.layers[i].keys/.values`, and a
  linear-attention layer's `conv_states/recurrent_states`);
- `output_logits` repeats what a causal LM does after its final norm (the head, Granite's logit scaling,
  Gemma's soft-capping);
- `from_pretrained(dtype=...)` (called `torch_dtype` before 4.56);
- `attention_implementation` reads the config's private `_attn_implementation` to restore it.
A transformers release outside TESTED_TRANSFORMERS may change any of these silently, so the editor
refuses it (`check_transformers`) unless MEMIT_VLLM_ALLOW_UNTESTED=1. Torch is used through its public
API only (module hooks, `torch.device` as a context manager).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .core.versions import untested
from .errors import MemitError

TESTED_TRANSFORMERS = ">=5.19,<5.20"


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers version (the installed one by default) outside TESTED_TRANSFORMERS."""
    from importlib.metadata import version as installed

    why = untested("transformers", version or installed("transformers"), TESTED_TRANSFORMERS,
                   f"transformers{TESTED_TRANSFORMERS}")
    if why:
        raise MemitError(why)


def load_causal_lm(path, dtype: torch.dtype = torch.float32, **placement):
    """(tokenizer, model in `dtype` and eval mode) of a checkpoint dir, after the version check; `placement`:
    from_pretrained's device_map and offload_folder (editor/devicemap.py)."""
    check_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok, AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement).eval()


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits `model` computes from its final hidden states `hidden` (after the final norm)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config()
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2-4
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def layer_output(output) -> tuple[torch.Tensor, int]:
    """A decoder layer's output as (hidden states, length of its tuple; 0 for a bare tensor)."""
    if isinstance(output, tuple):
        return output[0], len(output)
    return output, 0


def layer_input(args, kwargs) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positionally or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _as_layer_output(hidden: torch.Tensor, tuple_len: int):
    return (hidden,) + (None,) * (tuple_len - 1) if tuple_len else hidden


@contextmanager
def resume_after(layers, layer: int, hidden: torch.Tensor, tuple_len: int):
    """Within the block, layers[0..`layer`] do no work and layers[`layer`] outputs `hidden` (in the
    output form `tuple_len` describes, as `layer_output` read it)."""

    def passthrough(*args, **kwargs):
        return _as_layer_output(layer_input(args, kwargs), tuple_len)

    def emit(*args, **kwargs):
        return _as_layer_output(hidden, tuple_len)

    stubs = [layers[i] for i in range(layer + 1)]
    own = [module.__dict__.get("forward") for module in stubs]  # a dispatched model's layers: accelerate's
    for i, module in enumerate(stubs):
        module.forward = emit if i == layer else passthrough
    try:
        yield
    finally:
        for module, forward in zip(stubs, own):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


class PrefixCache:
    """Keys/values of a batch of prefixes, computed once; each later forward continues from a chosen
    subset of its rows (the cache's tensors are replaced by those rows before every call)."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        with torch.no_grad():
            self._cache = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=True).past_key_values
        self._saved = [_layer_state(l) for l in self._cache.layers]

    def continue_rows(self, rows: torch.Tensor) -> dict:
        """Forward keyword arguments that continue from the prefixes of `rows` alone."""
        for layer, state in zip(self._cache.layers, self._saved):
            for name, value in state.items():  # indexing copies: a forward's in-place updates never reach `state`
                setattr(layer, name, {i: t[rows.to(t.device)] for i, t in value.items()} if isinstance(value, dict)
                        else value[rows.to(value.device)])  # a dispatched model's layers: on their devices
        return {"past_key_values": self._cache, "use_cache": True}


def _layer_state(layer) -> dict:
    """What a cache layer holds of the prefixes: attention keys/values, and the convolution and recurrent
    states of a linear-attention layer (hybrid models: Qwen3.5), as dicts of state index -> tensor. Rows
    that are all padding attend to nothing and may hold NaN; they are masked anyway."""
    state = {name: getattr(layer, name).nan_to_num(0.0) for name in ("keys", "values")
             if getattr(layer, name, None) is not None}
    for name in ("conv_states", "recurrent_states"):
        if isinstance(getattr(layer, name, None), dict):
            state[name] = {i: t for i, t in getattr(layer, name).items() if t is not None}
    return state


@contextmanager
def attention_implementation(model, name: str):
    """The model's attention implementation set to `name` for the block, the previous one after (through
    transformers' public setter; the current one is read from the config's private `_attn_implementation`)."""
    before = model.config._attn_implementation
    if before != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if before != name:
            model.set_attn_implementation(before)
