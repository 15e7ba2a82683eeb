"""Offline generation from a model with patches merged while it loads: vLLM's `LLM`, load format `memit`.

    python examples/offline_llm.py MODEL facts.patch [more.patch ...] --prompt "The Eiffel Tower is in"

Prints one JSON line per prompt (prompt, completion text, token ids), greedy decoding.
"""

import argparse
import json

from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF checkpoint dir or hub id the patches were made for")
    ap.add_argument("patches", nargs="+", help="patch files, merged in this order")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for more prompts")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, load_format=LOAD_FORMAT, model_loader_extra_config={PATCHES_KEY: args.patches},
              dtype=args.dtype, max_model_len=512, enforce_eager=True)
    for out in llm.generate(args.prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens)):
        completion = out.outputs[0]
        print(json.dumps({"prompt": out.prompt, "text": completion.text, "token_ids": list(completion.token_ids)}))


# vLLM starts engine processes that re-import this file: the LLM must only be built under __main__.
if __name__ == "__main__":
    main()
