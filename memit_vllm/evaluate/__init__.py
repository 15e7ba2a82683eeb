"""`memit-vllm eval`: CounterFact and zsRE metrics of a model before and after its patches.

Kept import-light (no torch at package import) so that registering the CLI command costs nothing;
the entry point is `memit_vllm.evaluate.run.evaluate`. No vLLM imports here.
"""
