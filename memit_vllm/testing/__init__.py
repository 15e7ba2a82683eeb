"""Test and benchmark support, public so that tests, benchmarks and users' own CI share one copy:

- `tiny_models`: a tiny random checkpoint per architecture of the table (vLLM-servable on CPU);
- `synthetic`: real patch files with random low-rank deltas, and the ways such files break;
- `server`: a real vLLM server on 127.0.0.1 that is always torn down, and greedy completions from it
  and from transformers (the two sides every serving test compares).

Imports torch/transformers (not vLLM: servers are subprocesses); never imported by the library itself.
"""
