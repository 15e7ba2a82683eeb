"""Covariance statistics as files (README "Large jobs"): shards merge to the one-pass sums, merge and
make-patch refuse what does not belong together, the reference's .npz layout imports to the same
patch, and torch.distributed (2 gloo processes on 127.0.0.1) gives the single-process results."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memit_vllm.cli import main
from memit_vllm.editor import edit, load_requests, memit
from memit_vllm.editor.stats_file import read_stats, stats_for_edit
from memit_vllm.errors import MemitError
from memit_vllm.testing.tiny_models import build_tiny_model

CORPUS = "corpus/smollm2_self_2k.jsonl"
FAST = {"v_num_grad_steps": 4, "context_template_seeds": ["The", "I"], "context_template_length": 5}
LAYERS = [1, 2]
TOKENS = 30000  # several batches of covariance.BATCH_TOKENS: enough for 3 shards


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def compute(model, data_dir, out, *extra):
    result = cli("stats", "compute", "--model", model, "--corpus", data_dir / CORPUS, "--layers", "1,2",
                 "--tokens", TOKENS, "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return read_stats(out)


def sums(stats):
    return {l: stats.mom2_sum(l) for l in stats.layers}


def patch_of(model, data_dir, tmp_path, n=2, **kw):
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=n)
    return edit(model, requests, hparams={**FAST, "layers": LAYERS}, cache_dir=tmp_path / "cache", progress=False,
                **kw).patch


def assert_deltas_close(a, b, rtol):
    assert sorted(a.deltas) == sorted(b.deltas)
    for name in a.deltas:
        x, y = a.deltas[name].double(), b.deltas[name].double()
        assert (x - y).norm() <= rtol * y.norm(), (name, ((x - y).norm() / y.norm()).item())


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def whole(model, data_dir, tmp_path_factory):
    """One pass, and the same pass in 3 shards."""
    root = tmp_path_factory.mktemp("stats")
    one = compute(model, data_dir, root / "whole.st")
    shards = [compute(model, data_dir, root / f"s{i}.st", "--shard", f"{i}/3") for i in range(3)]
    return one, shards


def test_shards_merge_to_the_one_pass_statistics(whole, tmp_path):
    one, shards = whole
    assert one.complete and one.counts == {1: TOKENS, 2: TOKENS}
    assert sum(s.counts[1] for s in shards) == TOKENS and all(s.counts[1] > 0 for s in shards)
    assert not any(s.complete for s in shards)
    # in two steps and in any order: the result is the one pass, up to float64 rounding of the additions
    assert cli("stats", "merge", shards[2].path, shards[0].path, "--out", tmp_path / "part.st").exit_code == 0
    out = cli("stats", "merge", tmp_path / "part.st", shards[1].path, "--out", tmp_path / "merged.st", "--json")
    merged = read_stats(tmp_path / "merged.st")
    assert json.loads(out.output)["complete"] and merged.complete and merged.counts == one.counts
    assert merged.identity == one.identity
    for l, s in sums(one).items():
        torch.testing.assert_close(merged.mom2_sum(l), s, rtol=1e-12, atol=0)
        assert not torch.equal(s, torch.zeros_like(s))
    again = cli("stats", "merge", *(s.path for s in reversed(shards)), "--out", tmp_path / "again.st")
    assert again.exit_code == 0
    for l, s in sums(read_stats(tmp_path / "again.st")).items():  # order given does not matter: bit for bit
        assert torch.equal(s, read_stats(tmp_path / "merged.st").mom2_sum(l))


def test_make_patch_with_a_stats_file_is_make_patch_computing_them(model, data_dir, whole, tmp_path):
    one, shards = whole
    computed = patch_of(model, data_dir, tmp_path, stats_corpus=str(data_dir / CORPUS), stats_tokens=TOKENS)
    from_file = patch_of(model, data_dir, tmp_path, stats=one.path)
    # the same sums: the same deltas and covariance record (the hparams' source names the file)
    assert all(torch.equal(from_file.deltas[n], computed.deltas[n]) for n in computed.deltas)
    assert from_file.covariance == computed.covariance and from_file.hparams["mom2_n_tokens"] == TOKENS
    assert from_file.hparams["source"].endswith(f"statistics from {one.path.name}")
    out = cli("stats", "merge", *(s.path for s in shards), "--out", tmp_path / "merged.st")
    assert out.exit_code == 0, out.output
    from_shards = patch_of(model, data_dir, tmp_path, stats=tmp_path / "merged.st")
    assert_deltas_close(from_shards, computed, rtol=1e-6)


def test_statistics_of_fewer_tokens_than_d_ff_are_warned_of_from_a_corpus_and_from_a_file(model, data_dir, tmp_path):
    """C from fewer tokens than d_ff (128 here) is singular: the report says so, whichever way C came."""
    few = cli("stats", "compute", "--model", model, "--corpus", data_dir / CORPUS, "--layers", "1,2",
              "--tokens", 100, "--out", tmp_path / "few.st")
    assert few.exit_code == 0, few.output
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=1)

    def warnings_of(**kw):
        return edit(model, requests, hparams={**FAST, "layers": LAYERS}, cache_dir=tmp_path / "cache",
                    progress=False, **kw).report.warnings

    corpus = str(data_dir / CORPUS)
    for got in (warnings_of(stats_corpus=corpus, stats_tokens=100), warnings_of(stats=tmp_path / "few.st")):
        assert any("from 100 tokens, fewer than d_ff = 128" in w for w in got), got
    assert not any("d_ff" in w for w in warnings_of(stats_corpus=corpus, stats_tokens=1000))


@pytest.mark.parametrize("other, message", [
    (["--layers", "1,3"], "holds layers"),
    (["--dtype", "float64"], "differ in dtype"),
    (["--tokens", 20000], "differ in budget"),
    (["--model-dtype", "bfloat16"], "differ in forward"),
    ("another model", "differ in model"),
    ("shard 0/3 again", "is in both"),
    (["--shard", "1/2"], "of 2 shards"),
])
def test_merge_refuses_shards_of_different_passes_with_exit_2(other, message, model, data_dir, whole, tmp_path):
    _, shards = whole
    if other == "shard 0/3 again":
        path = shards[0].path
    else:
        path = tmp_path / "other.st"
        target = build_tiny_model("llama", tmp_path / "other", model, seed=1) if other == "another model" else model
        compute(target, data_dir, path, "--shard", "1/3", *(other if isinstance(other, list) else []))
    result = cli("stats", "merge", shards[0].path, path, "--out", tmp_path / "merged.st")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stats merge") and re.search(message, lines[0]), lines
    assert not (tmp_path / "merged.st").exists()


def test_make_patch_checks_the_stats_file_before_loading_the_model(model, data_dir, whole, tmp_path, monkeypatch):
    one, shards = whole
    other = build_tiny_model("llama", tmp_path / "other", model, seed=1)

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the stats file was checked")

    monkeypatch.setattr(memit, "load_editable", loaded)
    for kw, message in [
        ({"model": other, "stats": one.path}, "computed on other weights"),
        ({"stats": one.path, "layers": [1, 3]}, r"holds layers \[1, 2\], not \[3\]"),
        ({"stats": shards[1].path}, "holds shards 1 of 3: merge the others"),
        ({"stats": one.path, "stats_tokens": 10}, "drop --stats-tokens"),
        ({"stats": tmp_path / "missing.st"}, "does not exist"),
        ({"stats": one.path, "z": {"z_fisher_weight": 0.2}}, "read the statistics corpus"),
        ({"stats": one.path, "z": {"v_optimizer": "steepest_fisher"}}, "read the statistics corpus"),
        ({"stats": one.path, "z": {"corpus_restore_tokens": 512}}, "read the statistics corpus"),
        ({"z": {"corpus_restore_tokens": 512, "method": "alphaedit"}}, "which method alphaedit has not"),
    ]:
        target = kw.pop("model", model)
        if "layers" in kw:
            kw["hparams"] = {**FAST, "layers": kw.pop("layers")}
        if "z" in kw:
            kw["hparams"] = {**FAST, "layers": LAYERS, **kw.pop("z")}
        with pytest.raises(MemitError, match=message):
            requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=1)
            edit(target, requests, **{"hparams": {**FAST, "layers": LAYERS}, "cache_dir": tmp_path / "cache",
                                      "progress": False, **kw})


def test_a_reduced_precision_forward_is_recorded_and_taken_only_by_an_edit_in_it(model, data_dir, whole, tmp_path,
                                                                               monkeypatch):
    """As the covariance cache keys its entries: statistics of the model run in bf16 are other statistics
    than fp32 ones, so make-patch takes them only when it runs the model in bf16 too."""
    one, _ = whole
    half = compute(model, data_dir, tmp_path / "bf16.st", "--model-dtype", "bfloat16")
    assert half.identity == {**one.identity, "forward": "bfloat16"} and one.forward == "float32"
    assert not torch.equal(half.mom2_sum(1), one.mom2_sum(1))
    monkeypatch.setattr(memit, "load_editable", lambda *a, **k: pytest.fail("the model was loaded"))
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=1)
    with pytest.raises(MemitError, match=r"bf16.st was computed with the model in bfloat16, this edit runs it in "
                                         r"float32: compute it with stats compute --model-dtype float32"):
        edit(model, requests, hparams={**FAST, "layers": LAYERS}, cache_dir=tmp_path / "cache", progress=False,
             stats=half.path)
    with pytest.raises(MemitError, match="computed with the model in float32, this edit runs it in bfloat16: .* or "
                                         "edit with --stats-model-dtype float32"):
        edit(model, requests, hparams={**FAST, "layers": LAYERS}, cache_dir=tmp_path / "cache", progress=False,
             stats=one.path, dtype="bfloat16")
    stats_for_edit(half.path, one.identity["model"], LAYERS, one.d_ff, "bfloat16")  # the same forward: taken


def test_make_patch_stats_model_dtype_computes_what_stats_compute_model_dtype_does(model, data_dir, whole, tmp_path):
    """The bf16 statistics pass of an fp32 edit (--stats-model-dtype) is stats compute --model-dtype's:
    the same patch as from that file, another patch than fp32 statistics give."""
    one, _ = whole
    half = compute(model, data_dir, tmp_path / "bf16.st", "--model-dtype", "bfloat16")
    made = patch_of(model, data_dir, tmp_path, stats_corpus=str(data_dir / CORPUS), stats_tokens=TOKENS,
                    stats_model_dtype="bfloat16")
    from_file = patch_of(model, data_dir, tmp_path, stats=half.path, stats_model_dtype="bfloat16")
    fp32 = patch_of(model, data_dir, tmp_path, stats=one.path)
    assert made.hparams["mom2_model_dtype"] == "bfloat16" and made.hparams["dtype"] == "float32"
    assert all(torch.equal(from_file.deltas[n], made.deltas[n]) for n in made.deltas)
    assert not all(torch.equal(fp32.deltas[n], made.deltas[n]) for n in made.deltas)


def test_bf16_products_are_recorded_and_close_to_fp32_statistics(model, data_dir, whole, tmp_path):
    """--dtype bfloat16 rounds each batch's products once (summed in fp32 inside the matmul, then float64):
    other statistics (recorded as such), within a few 1e-3 of the fp32 sums."""
    one, _ = whole
    low = compute(model, data_dir, tmp_path / "bf16-products.st", "--dtype", "bfloat16")
    assert low.identity == {**one.identity, "dtype": "bfloat16"}
    for l in LAYERS:
        a, b = low.mom2_sum(l), one.mom2_sum(l)
        assert not torch.equal(a, b) and (a - b).norm() <= 1e-2 * b.norm()
    patch = patch_of(model, data_dir, tmp_path, stats=low.path)
    assert patch.hparams["mom2_dtype"] == "bfloat16" and patch.covariance["dtype"] == "bfloat16"


def test_damaged_or_foreign_stats_files_are_refused(whole, tmp_path):
    one, _ = whole
    raw = one.path.read_bytes()
    tensors = load_file(one.path)
    cases = {}
    (tmp_path / "truncated.st").write_bytes(raw[: len(raw) // 2])
    cases["truncated.st"] = "truncated or modified"
    (tmp_path / "header.st").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    cases["header.st"] = "not a safetensors file, or a header over"
    save_file(tensors, str(tmp_path / "plain.st"))
    cases["plain.st"] = "no format="
    with safe_open(one.path, "pt") as f:
        meta = f.metadata()
    narrow = tensors["layer1.mom2_sum"][:, :3].contiguous()
    save_file({**tensors, "layer1.mom2_sum": narrow}, str(tmp_path / "shape.st"), metadata=meta)
    cases["shape.st"] = "its tensors must be"
    save_file({**tensors, "layer1.count": torch.tensor([-5.0], dtype=torch.float64)}, str(tmp_path / "count.st"),
              metadata=meta)
    cases["count.st"] = "not a positive integer"
    nan = tensors["layer2.mom2_sum"].clone()
    nan[0, 0] = float("nan")
    save_file({**tensors, "layer2.mom2_sum": nan}, str(tmp_path / "nan.st"), metadata=meta)
    for name, message in cases.items():
        with pytest.raises(MemitError, match=message):
            read_stats(tmp_path / name)
    with pytest.raises(MemitError, match="NaN or Inf"):
        read_stats(tmp_path / "nan.st").mom2_sum(2)


def write_reference(root, stats, precision, samples=1000, model_dir="tiny_llama", ds="wikipedia"):
    """The reference's layout, as rome/layer_stats.py + util/runningstats.py write it (np.savez of a
    CombinedStat state dict)."""
    folder = root / model_dir / f"{ds}_stats"
    folder.mkdir(parents=True, exist_ok=True)
    for l in stats.layers:
        np.savez(folder / f"model.layers.{l}.mlp.down_proj_{precision}_mom2_{samples}.npz",
                 constructor="util.runningstats.CombinedStat()", sample_size=samples,
                 **{"mom2.constructor": "util.runningstats.SecondMoment()", "mom2.count": np.int64(stats.counts[l]),
                    "mom2.mom2": stats.mom2_sum(l).numpy().astype(precision)})
    return root


@pytest.mark.parametrize("precision, rtol", [("float64", 0.0), ("float32", 1e-4)])
def test_reference_layout_imports_to_the_patch_of_the_same_statistics(precision, rtol, model, data_dir, whole,
                                                                      tmp_path):
    one, _ = whole
    root = write_reference(tmp_path / "stats", one, precision)
    result = cli("stats", "import", "--model", model, "--from", root, "--layers", "1,2", "--out", tmp_path / "ref.st",
                 "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    imported = read_stats(tmp_path / "ref.st")
    assert imported.counts == one.counts and imported.identity["dtype"] == precision
    assert imported.identity["model"] == one.identity["model"]
    # The reference records no forward dtype: an edit running the model in bf16 takes them too.
    stats_for_edit(imported.path, one.identity["model"], LAYERS, one.d_ff, "bfloat16")
    files = imported.provenance["files"]
    assert files["1"]["name"] == f"model.layers.1.mlp.down_proj_{precision}_mom2_1000.npz"
    npz = root / "tiny_llama" / "wikipedia_stats" / files["1"]["name"]
    assert files["1"]["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert imported.provenance["dataset"] == "wikipedia" and imported.provenance["samples"] == 1000
    ours = patch_of(model, data_dir, tmp_path, stats=one.path)
    theirs = patch_of(model, data_dir, tmp_path, stats=tmp_path / "ref.st")
    assert theirs.covariance["provenance"]["files"] == files
    if rtol == 0:
        assert all(torch.equal(theirs.deltas[n], ours.deltas[n]) for n in ours.deltas)
    else:
        assert_deltas_close(theirs, ours, rtol)


def test_import_refuses_foreign_ambiguous_or_pickled_files(model, data_dir, whole, tmp_path):
    one, _ = whole
    run = lambda root, *extra: cli("stats", "import", "--model", model, "--from", root, "--layers", "1,2",  # noqa: E731
                                   "--out", tmp_path / "ref.st", "--cache-dir", tmp_path / "cache", *extra)
    both = write_reference(write_reference(tmp_path / "two", one, "float32"), one, "float64")
    result = run(both)
    assert result.exit_code == 2 and "several reference statistics" in result.output
    assert run(both, "--precision", "float64").exit_code == 0
    assert run(tmp_path / "two" / "tiny_llama" / "wikipedia_stats", "--precision", "float32").exit_code == 0
    (tmp_path / "empty").mkdir()
    assert "no reference statistics for layer 1" in run(tmp_path / "empty").output

    wide = tmp_path / "wide" / "m" / "wikipedia_stats"
    wide.mkdir(parents=True)
    for l in LAYERS:
        np.savez(wide / f"model.layers.{l}.mlp.down_proj_float32_mom2_10.npz",
                 **{"mom2.count": np.int64(5), "mom2.mom2": np.eye(200, dtype=np.float32)})
    result = run(tmp_path / "wide")
    assert result.exit_code == 2 and "mom2 is [200, 200]" in result.output and "another model" in result.output

    pickled = tmp_path / "pickled" / "m" / "wikipedia_stats"
    pickled.mkdir(parents=True)
    for l in LAYERS:
        np.savez(pickled / f"model.layers.{l}.mlp.down_proj_float32_mom2_10.npz",
                 **{"mom2.count": np.array([5, None], dtype=object), "mom2.mom2": np.eye(128, dtype=np.float32)})
    result = run(tmp_path / "pickled")
    assert result.exit_code == 2 and "mom2.count is not a single number" in result.output

    huge = tmp_path / "huge" / "m" / "wikipedia_stats"  # refused by its size, before a byte of it is read
    huge.mkdir(parents=True)
    for l in LAYERS:
        with open(huge / f"model.layers.{l}.mlp.down_proj_float32_mom2_10.npz", "wb") as f:
            f.truncate(1 << 40)  # sparse: 1 TiB on paper
    result = run(tmp_path / "huge")
    assert result.exit_code == 2 and "more than statistics of a" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd):
    """`memit-vllm ARGS` in 2 processes (gloo, one thread each) on 127.0.0.1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "memit_vllm", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# The z vectors of 3 edits per process differ from those of 6 in one batch by float32 rounding, which
# Adam's normalised steps amplify where a gradient is near zero (test_editor's batched-z test allows
# 0.1%); measured here: 1.2e-6 of each delta's norm.
DISTRIBUTED_RTOL = 1e-4
# Each torchrun process computes keys with one thread, this process with all cores: on a machine with more
# than two cores the float32 matmuls then sum in another order (CI measured up to 1.2e-6 absolute, 2e-4
# relative on one entry); a lost or doubled batch would move the sums by percents.
KEY_ROUNDING_RTOL = 1e-5


def test_torchrun_statistics_and_patch_equal_one_process(model, data_dir, whole, tmp_path):
    one, _ = whole
    torchrun("stats", "compute", "--model", model, "--corpus", data_dir / CORPUS, "--layers", "1,2", "--tokens",
             TOKENS, "--out", tmp_path / "dist.st", "--cache-dir", tmp_path / "cache", "--json", cwd=tmp_path)
    dist = read_stats(tmp_path / "dist.st")
    assert dist.identity == one.identity and dist.counts == one.counts and dist.complete
    for l, s in sums(one).items():  # keys equal up to float32 rounding: the threads per process differ
        assert (dist.mom2_sum(l) - s).norm() <= KEY_ROUNDING_RTOL * s.norm(), l

    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": LAYERS}))
    out = torchrun("make-patch", "--model", model, "--requests", data_dir / "counterfact" / "counterfact_500.json",
                   "--limit", 6, "--hparams", hp, "--stats-corpus", data_dir / CORPUS, "--stats-tokens", TOKENS,
                   "--cache-dir", tmp_path / "dist-cache", "--out", tmp_path / "dist.patch", cwd=tmp_path)
    assert out.stdout.count("wrote ") == 1, out.stdout  # rank 0 reports and writes
    from memit_vllm.patch import load_patch

    distributed = load_patch(tmp_path / "dist.patch")
    single = patch_of(model, data_dir, tmp_path, n=6, stats_corpus=str(data_dir / CORPUS), stats_tokens=TOKENS)
    assert distributed.covariance == single.covariance  # the statistics' record: same corpus, tokens, dtype
    assert_deltas_close(distributed, single, DISTRIBUTED_RTOL)

    # a child --on it: the parent's keys (no cache entry yet) are read by both ranks, as one process does
    later = tmp_path / "later.json"
    later.write_text(json.dumps(json.loads((data_dir / "counterfact" / "counterfact_500.json").read_text())[6:10]))
    torchrun("make-patch", "--model", model, "--requests", later, "--on", tmp_path / "dist.patch", "--hparams", hp,
             "--stats-corpus", data_dir / CORPUS, "--stats-tokens", TOKENS, "--cache-dir", tmp_path / "dist-cache",
             "--out", tmp_path / "child.patch", cwd=tmp_path)
    child = edit(model, load_requests(later), hparams={**FAST, "layers": LAYERS}, cache_dir=tmp_path / "cache",
                 progress=False, on=[distributed], stats_corpus=str(data_dir / CORPUS), stats_tokens=TOKENS)
    assert child.report.lineage_keys_read == 1 and child.report.preserved_keys == 6
    assert_deltas_close(load_patch(tmp_path / "child.patch"), child.patch, DISTRIBUTED_RTOL)
