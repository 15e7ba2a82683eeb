"""The z penalty's F (editor/sensitivity.py): what it predicts, and that the penalty steers the z."""

import json

import torch
import torch.nn.functional as F

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.compat import layer_output
from memit_vllm.core.records import load_requests
from memit_vllm.editor import default_hparams, load_editable
from memit_vllm.editor.arch import checkpoint_dims
from memit_vllm.editor.covariance import file_corpus
from memit_vllm.editor.sensitivity import output_fisher
from memit_vllm.editor.targets import compute_targets
from memit_vllm.editor.trace import capture

LAYER = 1


def _corpus(tmp_path, data_dir, n: int):
    lines = (data_dir / "corpus" / "smollm2_self_2k.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": json.loads(x)["text"][:200]}) for x in lines))
    return file_corpus(path)


def _kl_of_adding(em, ids: torch.Tensor, d: torch.Tensor) -> float:
    """Mean over positions s of the summed KL of every prediction at or after s when d is added to
    layer LAYER's output at s alone. KL(p || q) = sum p log p - p . logits_q + logsumexp(logits_q), in float64,
    over the positions from s on (those before s do not change)."""
    n = ids.shape[1]
    with torch.no_grad():
        base = F.log_softmax(em.model(ids).logits[0].double(), -1)
        p = base.exp()
        neg_entropy = (p * base).sum(-1)
        total = 0.0
        for s in range(n):
            def add(module, args, output, s=s):
                layer_output(output)[0][0, s] += d  # the layer's hidden states, in place
            handle = em.layers[LAYER].register_forward_hook(add)
            try:
                logits = em.model(ids).logits[0, s:].double()
            finally:
                handle.remove()
            total += float((neg_entropy[s:] - (p[s:] * logits).sum(-1) + torch.logsumexp(logits, -1)).sum())
    return total / n


def test_fisher_predicts_the_kl_of_a_small_change_of_the_hidden_state(tiny_models, data_dir, tmp_path):
    tok, em = load_editable(Checkpoint(tiny_models["llama"]))
    corpus = _corpus(tmp_path, data_dir, 24)
    fisher = output_fisher(em, tok, corpus, [LAYER], 10_000, torch.float32, seed=0).double()
    assert torch.allclose(fisher, fisher.T, atol=1e-9) and torch.linalg.eigvalsh(fisher).min() > -1e-9
    texts = [tok(t)["input_ids"] for t in corpus.texts()]
    size = 0.05 * float(capture(em, torch.tensor([texts[0]]), torch.ones(1, len(texts[0]), dtype=torch.long),
                                outputs=[LAYER]).outputs[LAYER].norm(dim=-1).mean())  # small: F is second order
    gen = torch.Generator().manual_seed(0)
    measured, predicted = [], []
    for _ in range(4):  # random directions; the mean over them and over the corpus's positions
        d = torch.randn(em.d_model, generator=gen)
        d *= size / d.norm()
        measured.append(sum(_kl_of_adding(em, torch.tensor([ids]), d) * len(ids) for ids in texts)
                        / sum(len(ids) for ids in texts))
        predicted.append(float(0.5 * d.double() @ fisher @ d.double()))
    ratio = sum(measured) / sum(predicted)
    assert 0.75 < ratio < 1.33, (measured, predicted)


def test_one_pass_over_several_layers_gives_the_mean_of_each_layers_own(tiny_models, data_dir, tmp_path):
    tok, em = load_editable(Checkpoint(tiny_models["llama"]))
    corpus = _corpus(tmp_path, data_dir, 8)
    each = [output_fisher(em, tok, corpus, [layer], 4096, torch.float32, seed=0) for layer in (0, 1, 2)]
    together = output_fisher(em, tok, corpus, [0, 1, 2], 4096, torch.float32, seed=0)
    assert torch.allclose(together, sum(each) / 3, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(each[0], each[2], rtol=0.05)  # the layers differ: the mean is not one of them


def test_the_backward_in_parts_gives_the_same_F_as_one_pass(tiny_models, data_dir, tmp_path):
    """The parts bound the memory of the backward (one part's activations), not what F is."""
    tok, em = load_editable(Checkpoint(tiny_models["llama"]))
    corpus = _corpus(tmp_path, data_dir, 12)
    whole = output_fisher(em, tok, corpus, [0, 2], 4096, torch.float32, seed=0, grad_tokens=10**9)
    parts = output_fisher(em, tok, corpus, [0, 2], 4096, torch.float32, seed=0, grad_tokens=64)
    other = output_fisher(em, tok, corpus, [0, 2], 4096, torch.float32, seed=1, grad_tokens=64)

    def off(f):
        return float(torch.linalg.norm(f - whole) / torch.linalg.norm(whole))
    assert off(parts) < 1e-5  # float32 rounding of other padded shapes
    assert off(other) > 0.05  # the seed's draws, not the parts, decide F


def test_the_penalty_makes_the_deltas_quieter_where_F_says(smollm2, data_dir, tmp_path):
    tok, em = load_editable(Checkpoint(smollm2))
    hp, _ = default_hparams(*checkpoint_dims(Checkpoint(smollm2)))
    hp = hp.replace(v_num_grad_steps=10, v_lr=2.0, z_dtype="float32", v_optimizer="adam", v_delivery_scale=1.0)
    reqs = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=4)
    layer = hp.layers[-1]
    fisher = output_fisher(em, tok, _corpus(tmp_path, data_dir, 16), hp.layers, 2048, torch.float32, seed=0)
    loudness, size = {}, {}
    for weight in (0.0, 1.0):
        z = compute_targets(em, tok, reqs, ["{}"], layer, hp.replace(z_fisher_weight=weight), progress=False,
                            fisher=lambda: fisher)
        loudness[weight] = float(0.5 * ((z.delta @ fisher) * z.delta).sum(1).mean())
        size[weight] = float((z.delta ** 2).sum(1).mean())
    assert loudness[1.0] < 0.7 * loudness[0.0], loudness
    # not merely smaller deltas (what weight decay gives): quieter per unit of size, i.e. other directions
    assert loudness[1.0] / size[1.0] < 0.9 * loudness[0.0] / size[0.0], (loudness, size)


def test_steepest_descent_in_the_metric_of_F_reaches_the_loss_with_quieter_deltas(smollm2, data_dir, tmp_path):
    """v_optimizer "steepest_fisher" steps along (F + ridge)^-1 g: at the same early-stop loss its deltas
    are quieter on ordinary text (d^T F d) than the Euclidean steepest descent's, and in other directions."""
    tok, em = load_editable(Checkpoint(smollm2))
    hp, _ = default_hparams(*checkpoint_dims(Checkpoint(smollm2)))
    hp = hp.replace(v_num_grad_steps=40, z_dtype="float32", v_early_stop_loss=0.3, v_optimizer="steepest",
                    v_delivery_scale=1.0)
    reqs = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=4)
    fisher = output_fisher(em, tok, _corpus(tmp_path, data_dir, 16), hp.layers, 2048, torch.float32, seed=0)
    loudness, size = {}, {}
    for optimizer in ("steepest", "steepest_fisher"):
        z = compute_targets(em, tok, reqs, ["{}"], hp.layers[-1], hp.replace(v_optimizer=optimizer), progress=False,
                            fisher=lambda: fisher)
        assert (z.final_loss < 0.3).all(), optimizer
        loudness[optimizer] = float(0.5 * ((z.delta @ fisher) * z.delta).sum(1).mean())
        size[optimizer] = float((z.delta ** 2).sum(1).mean())
    assert loudness["steepest_fisher"] < 0.8 * loudness["steepest"], loudness
    assert loudness["steepest_fisher"] / size["steepest_fisher"] < loudness["steepest"] / size["steepest"]
