"""memit-vllm: mass-edit facts with MEMIT, ship them as patch files, merge them in vLLM at load time."""

__version__ = "0.1.0"
