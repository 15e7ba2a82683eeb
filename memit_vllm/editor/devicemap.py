"""`make-patch --device-map`: a model larger than one GPU, or than RAM, loaded by accelerate across
GPUs, CPU RAM and disk (transformers' `device_map`, `offload_folder`), checked before anything loads.

A map is a name accelerate computes (auto, balanced, balanced_low_0, sequential: GPUs first, then CPU
RAM, then disk) or an explicit one, JSON or a JSON file: module name -> "cpu", "disk", a GPU index or
"cuda:N", with "" for every module not named. An explicit map is checked against the model's modules
(built on the meta device, no weights) and this machine's GPUs, and its "" entry is spelled out as the
modules it stands for (accelerate cannot dispatch "" beside other entries); "disk" needs an offload folder.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..core.files import check_can_create
from ..core.records import parse_json, read_text_file
from ..errors import MemitError
from . import distributed
from .offload import check_accelerate

NAMED = ("auto", "balanced", "balanced_low_0", "sequential")
FLAG = "--device-map"
MAX_MAP_FILE_BYTES = 1 << 20  # a map of module names to devices: anything larger is not one


@dataclass(frozen=True)
class Placement:
    device_map: str | dict
    offload_folder: str | None

    def load_kwargs(self) -> dict:
        """from_pretrained's keyword arguments."""
        return {"device_map": self.device_map, "offload_folder": self.offload_folder}


def describe(model) -> str:
    """Where a model loaded with a device map went, e.g. "device map (cpu: 4 modules, disk: 5 modules)"."""
    counts = Counter(str(d) for d in (getattr(model, "hf_device_map", None) or {}).values())
    if len(counts) < 2:  # transformers dispatches no hooks (nor records a map) for a model on one device
        return f"{next(model.parameters()).device} (the device map put the whole model there)"
    return "device map (" + ", ".join(f"{d}: {n} module{'s' * (n > 1)}" for d, n in counts.items()) + ")"


def check_placement(device_map, offload_folder, device: str | None, ckpt: Checkpoint) -> Placement | None:
    """The validated placement of `ckpt` (None: one device, as without a map); a MemitError naming the
    flag and the fix for anything that would fail at or after loading."""
    if device_map is None:
        if offload_folder is not None:
            raise MemitError("--offload-folder without --device-map: the model is loaded whole on one device; "
                             "add --device-map (e.g. auto) or drop --offload-folder")
        return None
    if device is not None:
        raise MemitError(f"--device and {FLAG} both given: the map says where each layer runs; drop --device")
    if distributed.world() > 1:
        raise MemitError(f"{FLAG} under torchrun: every process would load the model across the same devices; "
                         f"run one process, or drop {FLAG}")
    check_accelerate()
    parsed = parse_device_map(device_map)
    if isinstance(parsed, dict):
        _check_devices(parsed)
        parsed = _spelled_out(parsed, ckpt)
        disk = [k for k, v in parsed.items() if v == "disk"]
        if disk and offload_folder is None:
            raise MemitError(f"{FLAG} puts {disk[0]!r} on disk: give --offload-folder DIR (scratch space for "
                             "offloaded weights)")
    if offload_folder is not None:
        _check_folder(Path(offload_folder))
    return Placement(parsed, None if offload_folder is None else str(offload_folder))


def parse_device_map(spec) -> str | dict:
    """A named map, or the dict of a JSON object given as text, a file or a dict."""
    if isinstance(spec, dict):
        return _as_map(spec)
    text = str(spec).strip()
    if text in NAMED:
        return text
    source = "the map given"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise MemitError(f"{FLAG} {text!r}: expected one of {', '.join(NAMED)}, a JSON object of module -> "
                             "device, or a JSON file (no such file)")
        source = str(path)  # read as every small input file is (a non-UTF-8 file was a traceback)
        text = read_text_file(path, f"{FLAG} {path}", MAX_MAP_FILE_BYTES, fix="a device map names modules")
    try:
        value = parse_json(text, f"{FLAG} {source}")
    except json.JSONDecodeError as e:
        raise MemitError(f"{FLAG}: {source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); give "
                         '{"module": "device", ...}') from e
    if not isinstance(value, dict):
        raise MemitError(f"{FLAG}: expected a JSON object of module name -> device, not a {type(value).__name__}")
    return _as_map(value)


def _as_map(value: dict) -> dict:
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise MemitError(f"{FLAG}: module names are strings, not {bad[0]!r}")
    return dict(value)


def resolve_device(name: str | None) -> torch.device:
    """A --device (None: cuda when there is one, else the CPU) this machine has. Checked before the model
    loads: torch refused a misspelt one with a RuntimeError, and a GPU on a machine without CUDA with an
    AssertionError (tracebacks)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MemitError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from e
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise MemitError(f"--device {name}: this machine has {gpus} GPU(s); use cpu or a GPU it has")
    return device


def _check_devices(device_map: dict) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for module, where in device_map.items():
        index = _gpu_index(where)
        if index is None:
            raise MemitError(f"{FLAG}: {module!r} -> {where!r} is not a device; use \"cpu\", \"disk\", a GPU index "
                             "(0) or \"cuda:N\"")
        if index >= 0 and index >= gpus:
            raise MemitError(f"{FLAG}: {module!r} -> {where!r}, but this machine has {gpus} GPU(s); use \"cpu\", "
                             "\"disk\" or a GPU it has")


def _gpu_index(where) -> int | None:
    """-1 for cpu and disk, the GPU index for a GPU, None for anything else."""
    if where in ("cpu", "disk"):
        return -1
    if isinstance(where, int) and not isinstance(where, bool):
        return where if where >= 0 else None
    if isinstance(where, str) and (where == "cuda" or where.startswith("cuda:")):
        index = where.partition(":")[2] or "0"
        return int(index) if index.isdigit() else None
    return None


def _spelled_out(device_map: dict, ckpt: Checkpoint) -> dict:
    """The map with "" replaced by the largest modules (or tensors) that hold no named entry; a MemitError
    unless every key names a module or tensor of the model and every tensor falls under a key."""
    modules, tensors = _model_names(ckpt)
    unknown = [k for k in device_map if k and k not in modules and k not in tensors]
    if unknown:
        example = next((m for m in modules if m.endswith(".0")), "model.layers.0")
        raise MemitError(f"{FLAG}: {unknown[0]!r} is not a module of this model; keys are module names such as "
                         f"{example!r}, or \"\" for the rest")
    named = {k: v for k, v in device_map.items() if k}
    if not named:
        return device_map  # {"": device}: the whole model
    under = lambda t, k: t == k or t.startswith(k + ".")  # noqa: E731
    missing = [t for t in tensors if not any(under(t, k) for k in named)]
    if missing and "" not in device_map:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MemitError(f"{FLAG} places no device for {missing[0]}{more}: add an entry for its module, or \"\" "
                         "for everything not named")
    for t in missing:  # under the largest module of t's path that holds no named entry
        parts = t.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        named.setdefault(next(p for p in prefixes if not any(under(k, p) for k in device_map if k)), device_map[""])
    return named


def _model_names(ckpt: Checkpoint) -> tuple[set[str], list[str]]:
    """(module names, tensor names) of the model, built on the meta device (no weights); tensor names
    include tied ones and buffers, as accelerate places them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..compat import check_transformers

    check_transformers()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt.path))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name for name, _ in model.named_modules()}, [name for name, _ in tensors]


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise MemitError(f"--offload-folder {folder} is a file; give a directory (created if missing)")
    check_can_create(folder, f"--offload-folder {folder}")
