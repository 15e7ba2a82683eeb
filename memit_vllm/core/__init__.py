"""The facts every room of memit-vllm shares, written once: the architecture table, the edit-record
schema and its readers, the serving contract, atomic file writes, and token helpers.

Import-light on purpose: nothing here imports torch, click or vLLM at import time, so the CLI, the
editor, the patch format and the vLLM plugin can all depend on it without paying for each other.
"""
