"""Tiny random checkpoints, one per supported architecture, for coverage tests.

Sizes respect vLLM's CPU backend (head_dim 32). They share the default model's tokenizer so they
load offline in transformers and vLLM alike. Fixed seeds: the same call writes the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB = 49152  # the SmolLM2 tokenizer's

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=None, tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=4, n_head=2, n_positions=512),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=4, n_head=2, rotary_dim=16,
        n_positions=512, tie_word_embeddings=False),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, rotary_pct=0.25, max_position_embeddings=512,
        tie_word_embeddings=False),
}


def build_tiny_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random `arch` checkpoint (fp32 safetensors, config, tokenizer) to `out`."""
    config = CONFIGS[arch]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out
