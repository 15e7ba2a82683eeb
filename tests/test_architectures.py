"""What differs between the architectures of the table where the editor reads a model: the logits after
the final norm, the path from a down-projection to the residual stream, the batched z optimisation on
each layer stack (sliding windows, linear attention, shared keys/values), mixture-of-experts refusals,
and serving a patch of each in vLLM. The tests every architecture shares are parametrised over the
table in test_core, test_editor, test_patch_tools and test_foundation."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_vllm.core.architectures import ARCHITECTURES, MOE_MODEL_TYPES, by_config
from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY
from memit_vllm.editor import EditableModel, HParams, load_requests
from memit_vllm.editor.arch import check_layers, kv_source_layers
from memit_vllm.editor.reference import plain_z_delta
from memit_vllm.editor.targets import compute_targets
from memit_vllm.editor.trace import capture
from memit_vllm.errors import MemitError
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches
from memit_vllm.testing.server import api_server_cmd, hf_greedy, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch
from memit_vllm.testing.tiny_models import vllm_cannot_serve

ARCHS = sorted(ARCHITECTURES)
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "The weather today"]
TEMPLATES = ["{}", "Some text about things. {}", "Because it was late. {}"]


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return AutoTokenizer.from_pretrained(path), EditableModel(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_from_the_final_hidden_states_are_the_models_own(arch, tiny_models):
    tok, em = load(tiny_models[arch])
    ids = tok(PROMPTS[0], return_tensors="pt")
    hidden = em.model.base_model(**ids).last_hidden_state
    torch.testing.assert_close(em.logits(hidden), em.model(**ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_update_solved_in_output_space_moves_the_layer_output_as_asked(arch, tiny_models):
    """A change of layer 1's output that some update of its down-projection makes (a norm after the MLP
    allows no change along its input), asked of `to_output_space` and solved exactly on the keys, is
    made, also where a norm or scales sit between the down-projection and the residual stream."""
    tok, em = load(tiny_models[arch])
    block, a = em.layers[1], em.arch
    torch.manual_seed(0)
    if a.post_mlp_norm:  # a norm gain far from 1, and MLP outputs far above its eps (as in released models)
        block.get_submodule(a.post_mlp_norm).weight.uniform_(0.5, 2.0)
        em.down_proj(1).weight.mul_(100)
    if a.stream_scale:
        getattr(block, a.stream_scale).fill_(0.5)
    if arch == "gemma4_text":  # its per-layer-input branch after the MLP responds to the change as any later
        block.per_layer_projection.weight.zero_()  # layer does: MEMIT leaves that to its re-measured residuals
    ids = torch.tensor([tok(p).input_ids[:3] for p in PROMPTS])

    def read(**kw):
        got = capture(em, ids, torch.ones_like(ids), outputs=[1], **kw)
        return got.outputs[1][:, -1].double(), got

    h, got = read(keys=[1])
    K = got.keys[1][:, -1].T.double()  # [d_ff, n]
    some_update = torch.randn(em.d_model, em.d_ff, dtype=torch.float64)
    some_update *= 1e-3 * em.down_proj(1).weight.norm() / some_update.norm()
    em.add_to_weight(1, some_update.float())
    R = (read()[0] - h).T  # [d_model, n]: what it made
    em.add_to_weight(1, -some_update.float())
    solved = em.to_output_space(1, 1, K, R) @ torch.linalg.pinv(K)
    em.add_to_weight(1, solved.float())
    assert (read()[0] - h - R.T).norm() / R.norm() < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_z_equals_plain_per_edit_optimisation_on_every_layer_stack(arch, tiny_models, data_dir):
    """The prefix cache and the run from above layer L hold on every layer stack (Gemma's sliding windows
    and shared keys/values, Qwen3.5's linear attention); the logits are the model's own (Granite, Gemma 4)."""
    tok, em = load(tiny_models[arch])
    reqs = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3)
    hp = HParams(layers=[2], mom2_update_weight=1.0, v_num_grad_steps=8, z_batch_edits=3)
    batched = compute_targets(em, tok, reqs, TEMPLATES, 2, hp, progress=False)
    for i, r in enumerate(reqs):
        plain = plain_z_delta(em.model, tok, em.layers, r, TEMPLATES, 2, hp)
        assert (batched.delta[i] - plain).norm() / plain.norm() < 1e-3  # fp32 roundoff, as in test_editor


@pytest.mark.parametrize("config", [
    {"model_type": "mixtral"}, {"model_type": "qwen3_moe"}, {"model_type": "llama4_text"},
    {"model_type": "deepseek_v3"}, {"model_type": "qwen2_moe"},
    {"model_type": "gemma4_text", "enable_moe_block": True, "num_experts": 128},
    {"model_type": "qwen3", "num_experts": 8},
])
def test_mixture_of_experts_models_are_refused_saying_why(config):
    with pytest.raises(MemitError, match="mixture-of-experts.*per expert") as e:
        by_config(config)
    assert "\n" not in str(e.value)


def test_moe_checkpoint_is_refused_by_make_patch_before_loading(tiny_models, data_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    model = shutil.copytree(tiny_models["qwen3"], tmp_path / "moe")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    out = subprocess.run([sys.executable, "-m", "memit_vllm", "make-patch", "--model", str(model), "--requests",
                          str(data_dir / "counterfact" / "counterfact_500.json"), "--limit", "1",
                          "--out", str(tmp_path / "p.patch")], capture_output=True, text=True)
    assert out.returncode == 2 and "mixture-of-experts" in out.stderr and "Traceback" not in out.stderr
    assert MOE_MODEL_TYPES.isdisjoint(ARCHITECTURES)


def test_layers_at_or_above_shared_key_value_sources_are_refused(tiny_models):
    config = json.loads((tiny_models["gemma4_text"] / "config.json").read_text())
    assert kv_source_layers(config) == [3, 4]  # layers 5 and 6 reuse them
    check_layers([1, 2], 7, config)
    with pytest.raises(MemitError, match=r"reuse the keys/values of layers \[3, 4\].*below 3"):
        check_layers([2, 3], 7, config)
    assert kv_source_layers(json.loads((tiny_models["llama"] / "config.json").read_text())) == []


@pytest.mark.vllm
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("llama", "qwen2", "gpt2")])
def test_patch_served_by_vllm_equals_the_hf_merged_model(arch, tiny_models, tmp_path):
    """Greedy tokens of vLLM serving base + patch (the `memit` load format) are those of transformers on
    the merged checkpoint: vLLM runs the architecture as transformers does, and the patch lands where the
    editor meant it. gpt2 and qwen2 are served in test_plugin_tiny, llama in test_tensor_parallel (and as
    SmolLM2 in test_plugin_serve)."""
    if why := vllm_cannot_serve(arch):
        pytest.skip(why)
    model = tiny_models[arch]
    patch = synthetic_patch(model, layers=(1, 2), rank=2, seed=5, scale=30.0, name=arch).save(tmp_path / "p.patch")
    cmd = api_server_cmd(model, "--load-format", LOAD_FORMAT,
                         "--model-loader-extra-config", json.dumps({PATCHES_KEY: [str(patch)]}))
    with vllm_server(cmd, str(model), tmp_path / "serve.log") as server:
        tokens = server.greedy(PROMPTS, 8)
    merged = apply_patches([load_patch(patch)], model, tmp_path / "merged")
    assert tokens == hf_greedy(merged, PROMPTS, 8)
    assert tokens != hf_greedy(model, PROMPTS, 8), "the patch should change some greedy completions"
