"""The whole offline path a user takes: make-patch -> inspect -> verify -> apply -> the merged
checkpoint answers the edited prompts with the new targets (SmolLM2, the CLI as users run it)."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from transformers import AutoTokenizer

from memit_vllm.testing.server import hf_greedy

FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts.json"


def cli(*args):
    out = subprocess.run([sys.executable, "-m", "memit_vllm", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def cli_watched(*args) -> tuple[str, str]:
    """stdout and stderr of a command whose stderr is a terminal (a pty), as a person running it sees them."""
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    seen = []

    def read():
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the command closed the terminal
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    with os.fdopen(side, "wb") as stderr:
        out = subprocess.run([sys.executable, "-m", "memit_vllm", *args], stdout=subprocess.PIPE, stderr=stderr,
                             text=True)
    reader.join()
    os.close(main)
    err = b"".join(seen).decode(errors="replace")
    assert out.returncode == 0, err[-2000:]
    return out.stdout, err


def test_make_patch_inspect_verify_apply(smollm2, data_dir, tmp_path):
    patch = tmp_path / "facts.patch"
    # --model as a default model name: the CLI resolves it to the same checkpoint as the fixture's; stderr a
    # terminal: --json's report on stdout stays one JSON document while the progress bars show on stderr
    stdout, stderr = cli_watched("make-patch", "--model", "smollm2-135m", "--requests", str(FACTS), "--out",
                                 str(patch), "--stats-corpus", str(data_dir / "corpus" / "smollm2_self_2k.jsonl"),
                                 "--json")
    made = json.loads(stdout)
    assert "z vectors" in stderr and "layer updates" in stderr, stderr[-2000:]
    facts = json.loads(FACTS.read_text())
    assert made["n_edits"] == len(facts) and patch.is_file()

    info = json.loads(cli("inspect", str(patch), "--json"))
    assert info["patch_id"] == made["patch_id"]
    assert info["n_facts"] == len(facts)
    assert all(layer["rank"] <= len(facts) for layer in info["layers"])

    cli("verify", str(patch), "--model", str(smollm2))
    out = tmp_path / "edited"
    cli("apply", str(patch), "--model", str(smollm2), "--out", str(out))

    tok = AutoTokenizer.from_pretrained(out)
    completions = hf_greedy(out, [f["prompt"].format(f["subject"]) for f in facts], 4)
    for f, ids in zip(facts, completions):
        assert tok.decode(ids).strip().startswith(f["target_new"]), f
