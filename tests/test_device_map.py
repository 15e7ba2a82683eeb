"""make-patch --device-map: a model split by accelerate over CPU RAM and disk gives the patch of the
unsplit model, never writes the checkpoint, and a bad map is refused before anything loads.

Tolerance: the split model runs the same fp32 operations on the same CPU as the unsplit one (disk offload
only changes where a weight waits between forwards, and an offloaded layer's update is read back as
written), so the deltas are expected to be equal; 1e-6 of a delta's norm allows a BLAS whose reductions
depend on a tensor's memory layout. Measured: bit-identical (also with --z-dtype bfloat16 and --on)."""

import hashlib
import json

import pytest
from click.testing import CliRunner

from memit_vllm import make_patch
from memit_vllm.cli import main
from memit_vllm.editor import edit, load_requests
from memit_vllm.errors import MemitError

FAST = {"v_num_grad_steps": 6, "context_template_seeds": ["The", "I"], "context_template_length": 5}
# Layers 2-3 (two of the three edited), the final norm and the head offloaded to disk; the rest in RAM.
SPLIT = {"model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk", "lm_head": "disk", "": "cpu"}
TOLERANCE = 1e-6


def run(model, data_dir, cache, **kw):
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3)
    return edit(model, requests, hparams=FAST, layers=[1, 2, 3], stats_tokens=3000, cache_dir=cache, progress=False,
                stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"), **kw)


def assert_same_deltas(split, whole):
    assert split.deltas.keys() == whole.deltas.keys()
    for name, delta in whole.deltas.items():
        assert (split.deltas[name] - delta).norm() <= TOLERANCE * delta.norm(), name


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def unsplit(tiny_models, data_dir, tmp_path_factory):
    return run(tiny_models["llama"], data_dir, tmp_path_factory.mktemp("whole"))


def test_a_model_split_over_cpu_and_disk_gives_the_unsplit_patch(unsplit, tiny_models, data_dir, tmp_path):
    weights = tiny_models["llama"] / "model.safetensors"
    before = sha256(weights)
    # its own cache: the covariance pass also runs through the offloaded layers
    split = run(tiny_models["llama"], data_dir, tmp_path / "cache", device_map=SPLIT, offload_folder=tmp_path / "off")
    assert split.report.device.startswith("device map (") and "disk: 4 modules" in split.report.device
    assert split.report.covariance[2]["cached"] is False
    assert_same_deltas(split.patch, unsplit.patch)
    assert split.patch.base_weights == unsplit.patch.base_weights
    assert sha256(weights) == before, "updates of offloaded layers are kept in RAM, never written to the checkpoint"


def test_bf16_z_and_editing_on_a_stack_under_a_split(unsplit, tiny_models, data_dir, tmp_path):
    """--z-dtype bfloat16 casts offloaded weights as they load; --on merges the stack into them."""
    model, cache = tiny_models["llama"], tmp_path / "cache"
    kw = {"z_dtype": "bfloat16", "on": [unsplit.patch], "seed": 1}
    whole = run(model, data_dir, cache, **kw)
    split = run(model, data_dir, cache, device_map=json.dumps(SPLIT), offload_folder=tmp_path / "off", **kw)
    assert split.patch.made_on == whole.patch.made_on == [unsplit.patch.patch_id]
    assert_same_deltas(split.patch, whole.patch)


def cli(*args):
    return CliRunner().invoke(main, ["make-patch", *map(str, args)])


@pytest.mark.parametrize("flags, message", [
    (["--device-map", "{'model.layers.0': 'cpu'}"], "--device-map: the map given is not valid JSON"),
    (["--device-map", "everywhere"], "expected one of auto, balanced"),
    (["--device-map", '["cpu"]'], "expected one of auto"),
    (["--device-map", '{"": "gpu"}'], "'' -> 'gpu' is not a device"),
    (["--device-map", '{"": "cuda:99"}'], "but this machine has"),
    (["--device-map", '{"model.layer.2": "cpu", "": "cpu"}'], "'model.layer.2' is not a module of this model"),
    (["--device-map", '{"model.layers.0": "cpu"}'], "--device-map places no device for"),
    (["--device-map", '{"": "disk"}'], "give --offload-folder DIR"),
    (["--device-map", "auto", "--device", "cpu"], "--device and --device-map both given"),
    (["--offload-folder", "OFF"], "--offload-folder without --device-map"),
    (["--device", "bogus"], "--device 'bogus' is not a torch device; use cpu, cuda or cuda:N"),  # was a RuntimeError
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),  # without CUDA: was an AssertionError
])
def test_bad_maps_are_refused_before_loading(flags, message, tiny_models, data_dir, tmp_path):
    flags = [str(tmp_path / "off") if f == "OFF" else f for f in flags]
    out = cli("--model", tiny_models["llama"], "--requests", data_dir / "counterfact" / "counterfact_500.json",
              "--limit", "1", "--out", tmp_path / "p.patch", "--cache-dir", tmp_path / "cache", *flags)
    assert out.exit_code == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written: no patch, no offload folder, no statistics"


@pytest.mark.parametrize("flags", [["--out", "BLOCKED/p.patch"], ["--resume-dir", "BLOCKED/z"],
                                   ["--device-map", '{"": "cpu"}', "--offload-folder", "BLOCKED/off"]])
def test_every_folder_to_write_is_checked_alike_before_loading(flags, tiny_models, data_dir, tmp_path):
    """--out, --resume-dir and --offload-folder under a regular file: the same error, before the model loads."""
    (tmp_path / "file").write_text("")
    flags = [f.replace("BLOCKED", str(tmp_path / "file")) for f in flags]
    out_flag = [] if "--out" in flags else ["--out", tmp_path / "p.patch"]
    out = cli("--model", tiny_models["llama"], "--requests", data_dir / "counterfact" / "counterfact_500.json",
              "--limit", "1", "--cache-dir", tmp_path / "cache", *out_flag, *flags)
    message = f"cannot write there ({tmp_path / 'file'} is not a writable directory)"
    assert out.exit_code == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "nothing written"


def test_a_map_file_and_the_library_are_checked_alike(tiny_models, tmp_path):
    bad = tmp_path / "map.json"
    bad.write_text('{"model.layers.0": "cpu",}')
    for device_map in (bad, str(bad)):
        with pytest.raises(MemitError, match=f"--device-map: {bad} is not valid JSON"):
            make_patch(tiny_models["llama"], [{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}],
                       device_map=device_map, progress=False)
    for text, message in (('{"model.layers.0": "cpu", "model.layers.0": "disk"}', "key 'model.layers.0' appears twice"),
                          (b'{"model.layers.0": "caf\xe9"}', "is not UTF-8 text")):  # was a UnicodeDecodeError
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(MemitError, match=f"--device-map {bad}.*{message}"):
            make_patch(tiny_models["llama"], [{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}],
                       device_map=bad, progress=False)
    with pytest.raises(MemitError, match="module names are strings"):
        make_patch(tiny_models["llama"], [{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}],
                   device_map={0: "cpu"}, progress=False)
