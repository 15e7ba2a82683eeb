"""`memit-vllm eval --backend vllm` agrees with the transformers backend (issue 7: within 1e-3).

One real server for the module: the tiny Llama served by `memit-vllm serve` with a synthetic patch.
"""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from memit_vllm.cli import main
from memit_vllm.testing.server import BASE_ARGS, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def patch(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch")
    return synthetic_patch(tiny_models["llama"], layers=(1, 2), rank=4, scale=50.0).save(out / "p.patch")


@pytest.fixture(scope="module")
def server(tiny_models, patch, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    cmd = [sys.executable, "-m", "memit_vllm", "serve", str(tiny_models["llama"]), "--memit-patch", str(patch),
           *BASE_ARGS]
    with vllm_server(cmd, str(tiny_models["llama"]), log) as s:
        yield s


def run_json(*args) -> dict:
    result = CliRunner().invoke(main, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("data,extra", [("counterfact/counterfact_500.json", ["--n", 2, "--fluency"]),
                                        ("counterfact/counterfact_edit_10k.json", ["--n", 6]),
                                        ("zsre/zsre_mend_train_1k.json", ["--n", 6])])
def test_backends_agree(tiny_models, patch, server, data_dir, data, extra):
    common = ["--model", tiny_models["llama"], "--patch", patch, "--data", data_dir / data, *extra]
    local = run_json(*common)
    served = run_json(*common, "--backend", "vllm", "--server", server.url)
    assert "before" not in served and served["after_server"] == server.url
    assert served["patches"] == local["patches"]
    for name, value in local["after"].items():
        assert served["after"][name] == pytest.approx(value, abs=1e-3), name


def test_server_with_other_patches_is_refused(tiny_models, server, data_dir):
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_models["llama"]), "--backend", "vllm",
                                       "--server", server.url, "--data",
                                       str(data_dir / "zsre" / "zsre_mend_train_1k.json"), "--n", "1"])
    assert result.exit_code == 2 and "serves patches ['mp1-" in result.stderr
