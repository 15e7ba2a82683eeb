"""Read-only access to an HF safetensors checkpoint: keys, lazy tensors, fingerprints.

Patches are tied to the exact checkpoint bytes of the weights they modify, so fingerprints are
taken from the files (not from a model in memory, whose dtype may differ from the checkpoint's).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from .core.architectures import ARCHITECTURES
from .core.files import atomic_file
from .errors import MemitError

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

# Config keys that describe how a config was saved rather than the model it describes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
                         "_model_name_or_path"}


def tensor_fingerprint(t: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and the raw bytes of a tensor (bf16-safe: hashed as bytes)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_fingerprint(config: dict) -> str:
    canonical = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def resolve_model_path(model: str) -> Path:
    """A local checkpoint dir, the name of a default model (`memit-vllm model list`, prepared on first
    use), or an HF hub id resolved through the local HF cache / download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from .default_models import KNOWN_MODELS, prepare

    if model in KNOWN_MODELS:
        return prepare(model)
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise MemitError(f"model {model!r} is not a checkpoint directory (nor an HF hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, ...: one message either way
        raise MemitError(f"could not fetch model {model!r} from the HF hub ({e}); pass a local checkpoint dir") from e


class Checkpoint:
    def __init__(self, model: str | Path):
        self.path = resolve_model_path(str(model))
        if not (self.path / "config.json").is_file():
            raise MemitError(f"{self.path} has no config.json: not an HF checkpoint directory")
        self._files = self._weight_files()

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {k: self.path / f for k, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise MemitError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of "
                                 "weight name -> shard file); re-save the checkpoint") from e
            for f in sorted(set(files.values())):
                with self._open(f):
                    pass
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MemitError(f"{self.path} has no *.safetensors weights (only safetensors checkpoints are read)")
        out = {}
        for f in files:
            with self._open(f) as st:
                out.update({k: f for k in st.keys()})
        return out

    def _open(self, f: Path):
        """safe_open, with a damaged or missing shard as one clear error (safetensors checks the header
        and that the file holds every byte it describes)."""
        try:
            return safe_open(f, "pt")
        except Exception as e:  # SafetensorError, OSError: the message names the shard either way
            raise MemitError(f"weight file {f} cannot be read as safetensors ({type(e).__name__}); is it "
                             "truncated or missing? re-download or re-save the checkpoint") from e

    @cached_property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def architecture(self) -> str:
        """The model class, e.g. LlamaForCausalLM. A config without `architectures` (the prepared SmolLM2)
        gets the class of its model_type in the architecture table, as transformers and vLLM pick it."""
        if self.config.get("architectures"):
            return self.config["architectures"][0]
        model_type = self.config.get("model_type", "?")
        arch = ARCHITECTURES.get(model_type)
        return arch.hf_class if arch else model_type

    @property
    def dtype(self) -> str:
        """The dtype the checkpoint is meant to run in: config.json's `dtype` (`torch_dtype` before
        transformers 4.56), else its first weight's, e.g. "bfloat16"."""
        named = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(named, str):
            return named.removeprefix("torch.")
        first = self.keys()[0]
        with self._open(self._files[first]) as st:
            stored = st.get_slice(first).get_dtype()
        return _SAFETENSORS_DTYPES.get(stored, stored)

    @property
    def config_sha256(self) -> str:
        return config_fingerprint(self.config)

    def keys(self) -> list[str]:
        return sorted(self._files)

    def weight_files(self) -> list[Path]:
        """The safetensors files that hold the weights (the shards an index names, or all of them)."""
        return sorted(set(self._files.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise MemitError(f"{self.path} has no weight named {name!r}")
        with self._open(self._files[name]) as st:
            return st.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._files:
            raise MemitError(f"{self.path} has no weight named {name!r}")
        with self._open(self._files[name]) as st:
            return tuple(st.get_slice(name).get_shape())

    def fingerprint(self, name: str) -> str:
        return tensor_fingerprint(self.tensor(name))


def weights_sha256(ckpt: Checkpoint, cache: Path) -> str:
    """SHA-256 of all weight files' contents; per-file digests are remembered by (path, size, mtime)."""
    from .cache import sha256_file

    index_path = cache / "file-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    h = hashlib.sha256(ckpt.config_sha256.encode())
    for f in ckpt.weight_files():
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in index:
            index[key] = sha256_file(f)
        h.update(index[key].encode())
    with atomic_file(index_path) as tmp:
        tmp.write_text(json.dumps(index))
    return h.hexdigest()
