"""Long fuzz run of the patch reader: mutate a valid patch file for a while, count what was tried.

The CI test (tests/test_patch_format.py) runs 200 hypothesis examples; this runs the same mutations
(memit_vllm.testing.synthetic) for as long as asked and reports every exception that is not a PatchError.

    .venv/bin/python bench/fuzz_patches.py --seconds 180

Exit status 1 if any file raised something other than a PatchError.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.default_models import prepare
from memit_vllm.patch import PatchError, load_patch
from memit_vllm.patch.merge import PatchSet
from memit_vllm.testing.synthetic import MUTATIONS, mutate, synthetic_patch
from memit_vllm.testing.tiny_models import build_tiny_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="how long to run (default 180)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    outcomes: collections.Counter = collections.Counter()
    unexpected = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = build_tiny_model("llama", d / "llama", prepare("smollm2-135m"))
        ckpt = Checkpoint(model)
        seed = synthetic_patch(model).save(d / "seed.patch").read_bytes()
        path, tried, end = d / "fuzzed.patch", 0, time.monotonic() + args.seconds
        while time.monotonic() < end:
            kind = rnd.choice(MUTATIONS)
            path.write_bytes(mutate(seed, kind, rnd, d / "scratch.patch"))
            tried += 1
            try:
                PatchSet([load_patch(path, verify_content=True)]).validate(ckpt)
                outcomes[(kind, "accepted")] += 1
            except PatchError as e:
                outcomes[(kind, type(e).__name__)] += 1
            except Exception as e:  # noqa: BLE001 -- the point: anything else is a bug
                outcomes[(kind, f"UNEXPECTED {type(e).__name__}")] += 1
                unexpected.append((kind, traceback.format_exc()))
    print(f"files tried: {tried} in {args.seconds:.0f} s (seed {args.seed})")
    for (kind, outcome), n in sorted(outcomes.items()):
        print(f"  {kind:13s} {outcome:25s} {n}")
    for kind, tb in unexpected[:5]:
        print(f"\n--- {kind}:\n{tb}")
    print(f"unexpected exceptions: {len(unexpected)}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
