"""MEMIT hyperparameters: reference names, published presets, and defaults derived for other models.

Why derive: lambda (`mom2_update_weight`) trades edit strength against preserving the key
distribution C = E[k k^T]. For one edit with key k, the update delivers a fraction s/(1+s) of the
residual, where s = k^T (lambda C)^-1 k. Under the corpus distribution E[k^T C^-1 k] = d_ff, so s
scales as d_ff / lambda: lambda must scale with d_ff, not be copied from a 6B model. The published
settings sit at lambda/d_ff = 0.9 (GPT-J: 15000/16384), 1.05 (Llama-3-8B), 3.1 (GPT-2 XL); with
lambda = 15000 on SmolLM2 (d_ff 1536, ratio 9.8) most of each residual is never delivered.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

from ..core.records import parse_json, read_text_file
from ..errors import MemitError

# Keys of the reference implementations' hparams files that name modules; we derive those from the
# architecture, so they are accepted and ignored.
_REFERENCE_ONLY_KEYS = {
    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
    "lm_head_module", "fact_token", "layer_selection", "v_loss_layer", "mom2_adjustment", "mom2_dataset",
    "mom2_n_samples", "alg_name", "model_name", "device", "stats_dir", "model_parallel", "batch_size",
    "max_length",
}


MAX_LAYERS = 1024  # more than any model has: bounds a --layers range before it is listed
METHODS = ("memit", "alphaedit")
LINEAGE_KEYS = ("as_made", "current")  # editor/lineage_keys.py
EARLY_STOPS = ("loss", "most_probable")
OPTIMIZERS = ("adam", "steepest", "steepest_fisher")  # of the z deltas: editor/targets.py
FORWARD_DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes
# The k k^T products of the covariance pass (mom2_dtype). bfloat16: one batch's products are summed in
# fp32 inside the matmul and rounded to bf16 once, then summed in float64 (docs/benchmarks.md, "In bf16").
PRODUCT_DTYPES = ("float32", "float64", "bfloat16")


@dataclass
class HParams:
    layers: list[int]
    mom2_update_weight: float  # lambda
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 0.05
    # When an edit's z optimisation stops: "loss" (under v_early_stop_loss, the reference's) or
    # "most_probable" (its target is the argmax after every rewrite row: editor/targets.py).
    v_early_stop: str = "loss"
    # How the z deltas descend: "adam" (the reference's; v_lr is its step size), "steepest" (each step moves
    # an edit's delta by v_step x |h| along its negative gradient: no per-coordinate scaling, so it reaches
    # the early stop with a shorter, quieter delta) or "steepest_fisher" (the same in the metric of F, the
    # output Fisher of z_fisher_weight: the quietest direction on ordinary text; editor/targets.py).
    v_optimizer: str = "adam"
    v_step: float = 0.0667
    # Each optimised delta is multiplied by this (and clamped) before it becomes the target z. The update
    # delivers only part of a residual (lambda*C's ridge, the spreading over layers), and less to the keys of
    # the prompt's paraphrases than to its own: a delta that just reaches the early stop lands short there.
    # Steepest deltas are short, so they need the margin that Adam's clamp-length deltas carry by accident
    # (docs/hyperparameters.md, "Session 18"). Applied after the z store: scales share one optimisation.
    v_delivery_scale: float = 1.0
    # Instead of one scale for every delta (0: off): a first update with the unscaled deltas measures the
    # share rho_i of each delta that reaches the last edited layer at its prompt, and the update kept is
    # made with each delta times this / rho_i (within targets.DELIVERY_SCALES and the clamp). A uniform
    # scale gives a surplus to the edits the update delivers well (SmolLM2: scales 0.92-1.40 at 0.9), and every
    # surplus leaks onto other keys; this gives each edit what it lacks. Costs a second update (and a copy of
    # the edited layers' weights to go back to).
    v_delivery_target: float = 0.0
    context_template_length: int = 10
    context_template_seeds: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    mom2_n_tokens: int | None = None  # covariance token budget; None: the whole corpus
    mom2_dtype: str = "float32"  # the outer products' dtype (PRODUCT_DTYPES); their sums are float64
    # The dtype the model runs in for the covariance pass (None: the model's own). A forward-only pass:
    # bfloat16 is ~2x faster on AVX-512 BF16 CPUs; the keys' products and sums keep mom2_dtype / float64.
    mom2_model_dtype: str | None = None
    z_batch_edits: int = 16  # edits optimised together (memory/speed only; results do not depend on it)
    # The dtype of the z forward/backward through the layers above L (editor/precision.py); None: the model's
    # own. The delta, its Adam state and the loss are fp32 whatever this says.
    z_dtype: str | None = None
    # The dtype the model runs in while the update reads keys and outputs (None: the model's own); keys are
    # averaged in fp32, the solves are float64, and the update is added to the weights in their own dtype.
    keys_dtype: str | None = None
    # A penalty in the z loss on how loud the delta is on text in general (editor/sensitivity.py): this
    # weight times delta^T F delta / 2, an expected KL in nats; 0 turns it off. F is read over the first
    # z_fisher_tokens tokens of the statistics corpus.
    z_fisher_weight: float = 0.0
    z_fisher_tokens: int = 8192
    # The update rule (editor/solve.py): "memit" (eq. 14, preserved keys join the lambda*C memory term) or
    # "alphaedit" (the update projected onto the near-null space of C, Fang et al. 2025).
    method: str = "memit"
    nullspace_threshold: float = 2e-2  # alphaedit: eigenvalues of C below this span the projection
    L2: float = 10.0  # alphaedit: ridge on the update (the reference's name)
    preserve_lineage: bool = True  # with --on: the lineage's facts join the preserved keys
    # Which keys of the lineage's facts (editor/lineage_keys.py): "as_made" (read on the model their patch left,
    # cached: no cost per earlier fact) or "current" (re-read on the model being edited, each time).
    lineage_keys: str = "as_made"
    preserve_weight: float = 1.0  # each --preserve prompt key's weight in the solve (an edit key counts 1)
    # What the solve asks of the preserved prompts (--preserve, neighbours): false holds their outputs where
    # the model has them when each layer is solved; true pulls them back to the outputs they had at the last
    # edited layer before the update (a stack's included), undoing what its lower layers moved there
    # (editor/restore.py).
    preserve_restore: bool = False
    # Each edit's own prompt held (or restored, as the preserved prompts) at every position but its subject's
    # last token, each key at this weight (0: off): the update is to act at the edit key alone
    # (editor/preserve.py, own_prompts).
    own_prompt_weight: float = 0.0
    # The first this many statistics-corpus tokens are pulled back the same way (0: off): lambda C holds
    # every corpus key's output where the layers below left it, so an update's lower layers' leak onto
    # ordinary text stays; pulled back (weight lambda per token's share of E[.], as C counts), the upper
    # layers undo it (editor/restore.py). Method memit only.
    corpus_restore_tokens: int = 0
    # Other subjects each edit's prompt is asked of, preserved (--neighbour-subjects, which overrides it): a
    # subjects file, "model:N" or "vocab:N" (editor/preserve.py); None or "none": none.
    neighbour_subjects: str | None = None
    # After the solve, the edited layers' deltas take this many Adam steps together (0: off) on the edits'
    # CE plus the next-token KL (unedited vs edited) of the preserved prompts and of statistics-corpus text,
    # each KL weighted to weigh these many times the CE before the first step: the layers' compounding, which
    # each layer's solve cannot see (editor/refine.py).
    refine_steps: int = 0
    refine_lr: float = 3e-4
    refine_neighbour_weight: float = 3.5
    refine_corpus_weight: float = 1.5

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def reads_fisher(self) -> bool:
        """Whether the z optimisation needs F (editor/sensitivity.py), read over the statistics corpus."""
        return bool(self.z_fisher_weight) or self.v_optimizer == "steepest_fisher"

    @property
    def reads_corpus(self) -> bool:
        """Whether the edit reads the statistics corpus itself (F, texts to restore or to refine on), not only C."""
        return self.reads_fisher or self.corpus_restore_tokens > 0 or (self.refine_steps > 0
                                                                        and self.refine_corpus_weight > 0)

    def replace(self, **overrides) -> "HParams":
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            known = sorted(f.name for f in fields(self))
            raise MemitError(f"unknown hyperparameters {sorted(unknown)}; known: {known}")
        merged = {**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        for name, value in merged.items():
            _check(name, value)
        if merged["v_delivery_target"] and merged["v_delivery_scale"] != 1:
            raise MemitError(f"v_delivery_target {merged['v_delivery_target']} and v_delivery_scale "
                             f"{merged['v_delivery_scale']} both scale the z deltas: set v_delivery_target to 0 "
                             "(one scale for all) or v_delivery_scale to 1 (a scale per edit)")
        return HParams(**merged)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# name -> (test, what the value must be); checked on every HParams made by replace(), before any model loads
_RULES = {
    "layers": (lambda v: isinstance(v, list) and v and all(_is_int(x) and x >= 0 for x in v),
               "a non-empty list of layer indices, e.g. [4, 5, 6]"),
    "mom2_update_weight": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "v_num_grad_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "v_lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "v_weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "clamp_norm_factor": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "kl_factor": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "v_early_stop_loss": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "v_early_stop": (lambda v: v in EARLY_STOPS, f"one of {', '.join(EARLY_STOPS)}"),
    "v_optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "v_step": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1] (a fraction of the hidden state's norm)"),
    "v_delivery_scale": (lambda v: _is_number(v) and 1 <= v <= 4, "a number in [1, 4]"),
    "v_delivery_target": (lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2] (0: off)"),
    "context_template_length": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "context_template_seeds": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
                               "a list of non-empty strings"),
    "mom2_n_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 (or null: all tokens)"),
    "mom2_dtype": (lambda v: v in PRODUCT_DTYPES, f"one of {', '.join(PRODUCT_DTYPES)}"),
    "mom2_model_dtype": (lambda v: v is None or v in FORWARD_DTYPES,
                         f"one of {', '.join(FORWARD_DTYPES)} (or null: the model's dtype)"),
    "z_batch_edits": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "z_dtype": (lambda v: v is None or v in FORWARD_DTYPES,
                f"one of {', '.join(FORWARD_DTYPES)} (or null: the model's dtype)"),
    "keys_dtype": (lambda v: v is None or v in FORWARD_DTYPES,
                   f"one of {', '.join(FORWARD_DTYPES)} (or null: the model's dtype)"),
    "z_fisher_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    "z_fisher_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "nullspace_threshold": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "L2": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "preserve_lineage": (lambda v: isinstance(v, bool), "true or false"),
    "lineage_keys": (lambda v: v in LINEAGE_KEYS, f"one of {', '.join(LINEAGE_KEYS)}"),
    "preserve_weight": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "preserve_restore": (lambda v: isinstance(v, bool), "true or false"),
    "own_prompt_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    "corpus_restore_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "refine_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "refine_lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "refine_neighbour_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "refine_corpus_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "neighbour_subjects": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                           "a subjects file, model:N, vocab:N or none"),
}


def _check(name: str, value) -> None:
    test, what = _RULES[name]
    if not test(value):
        raise MemitError(f"hyperparameter {name} must be {what}, not {value!r}")


@dataclass(frozen=True)
class Preset:
    """Settings published (or measured, see docs) for one model size; matched by type, depth and d_ff."""

    model_type: str
    n_layers: int
    d_ff: int
    layers: list[int]
    mom2_update_weight: float
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    source: str = ""
    recipe: dict = field(default_factory=dict)  # further settings measured for this model (HParams names)
    on_stack: dict = field(default_factory=dict)  # over `recipe`, for a patch made on a stack (--on, --chunk)
    small_batch_lambda: float = 1.0  # lambda's factor in small batches (batch_lambda_factor), one batch only
    # refine_steps for one batch by its size: (fewest edits, steps), ascending; the last that the batch reaches
    refine_by_batch: tuple[tuple[int, int], ...] = ()


# lambda / d_ff for models without a preset: see the module docstring and docs/hyperparameters.md.
LAMBDA_PER_DFF = 0.5

# Lambda by batch size. With the delivery target each delta is scaled to the same delivery whatever lambda,
# so a larger lambda buys the same edits with less of the corpus's keys spent: on SmolLM2 at 100 edits lambda x2
# (768) kept the rewrites (0.98) and cut the held-out KL 13% (0.0234 -> 0.0203, under issue 18's 0.0215). In
# large batches the per-edit scales meet their cap instead: at 1,000 edits x2 lost 2 points of rewrites (0.911
# -> 0.891, under the 0.90 target), at 300 3 points (docs/hyperparameters.md, "Session 27"). So a preset's
# small-batch factor holds up to SMALL_BATCH edits and falls geometrically in log(edits) to 1 at LARGE_BATCH
# (through the command line at 100 edits: KL 0.0229 -> 0.0198 for one rewrite; at 300 the rule's x1.44 took 7%
# off the KL for one rewrite in 300: "Session 28").
SMALL_BATCH, LARGE_BATCH = 100, 1000

PRESETS = [
    Preset("gpt2", 48, 6400, [13, 14, 15, 16, 17], 20000, source="MEMIT paper, GPT-2 XL"),
    Preset("gptj", 28, 16384, [3, 4, 5, 6, 7, 8], 15000, source="MEMIT paper, GPT-J 6B"),
    Preset("llama", 32, 14336, [4, 5, 6, 7, 8], 15000, v_lr=0.1, source="MEMIT reference, Llama-3-8B"),
    # SmolLM2-135M, measured on counterfact_500 (layers, lambda: docs/hyperparameters.md) and chosen by both
    # the teacher-forced and the generated view (issue 18; "Session 19" to "Session 21"): a short z in F's
    # metric delivered to a target per edit (its forward in bf16: the delta, loss and solves stay
    # fp32/float64), the model's own names as neighbours, and the edits' own prompts held but at the edit key
    # ("Session 26"). On a stack, the quieter per-patch setting that keeps a 1,000-edit lineage, with 32,768
    # corpus tokens pulled back to the stack's outputs (docs/benchmarks.md, "Session 21"); own prompts are not
    # measured there and stay off.
    Preset("llama", 30, 1536, [3, 4, 5, 6, 7, 8, 9], 384, v_num_grad_steps=40, source="measured, SmolLM2-135M",
           recipe={"v_optimizer": "steepest_fisher", "v_early_stop_loss": 0.05, "v_delivery_target": 0.9,
                   "z_dtype": "bfloat16", "preserve_weight": 0.125, "neighbour_subjects": "model:2000",
                   "own_prompt_weight": 0.125},
           on_stack={"v_delivery_target": 0.0, "mom2_update_weight": 768, "preserve_weight": 0.0625,
                     "corpus_restore_tokens": 32768, "own_prompt_weight": 0.0},
           small_batch_lambda=2.0,
           # the deltas refined together after the solve ("Session 31" to "Session 33": at 100 edits rewrites
           # 0.97 -> 1.00, unrelated first words kept 0.880 -> 0.907, whole answers kept 0.418 -> 0.480, KL -8%;
           # 30 steps there bought nothing. From 300 edits 30 steps bought every generated score over 10: at
           # 1,000 rewrites 0.911 -> 0.961, first words 0.738 -> 0.793, KL -29%)
           refine_by_batch=((SMALL_BATCH, 10), (300, 30))),
]


def batch_lambda_factor(small_batch_lambda: float, n_edits: int) -> float:
    """The factor on a preset's lambda for one batch of `n_edits` (see SMALL_BATCH)."""
    position = math.log(max(n_edits, SMALL_BATCH) / SMALL_BATCH) / math.log(LARGE_BATCH / SMALL_BATCH)
    return small_batch_lambda ** max(0.0, 1.0 - position)


# --neighbours-per-edit's default: 10 per edit (chosen at 100 edits), fewer in larger batches. The neighbour
# prompts of other edits (the same relation templates) hold an edit's key too, so each layer's delivery falls
# with their total: on SmolLM2 1,000 prompts at 100 edits let it deliver 72% of its residual, at 1,000 edits
# 2,000 / 3,000 / 5,000 / 10,000 prompts 60 / 54 / 48 / 37% (rewrites 0.89 / 0.87 / 0.79 / 0.60, unrelated first
# words kept 0.74 / 0.75 / 0.77 / 0.82; docs/hyperparameters.md, "Session 25"). The edits' own prompts held
# (own_prompt_weight) grow with the batch too, so the neighbours fall faster than 1 / edits: (NEIGHBOURS_SCALE /
# edits)^2 per edit, 10 up to 316 edits (at 300: rewrites 0.95, first words kept 0.79), 1 from 708 (at 1,000: 0.91,
# 0.81, where 3,000 prompts without own prompts gave 0.87, 0.75): "Session 26". Fitted through those two sizes.
NEIGHBOURS_PER_EDIT = 10
NEIGHBOURS_SCALE = 1000


def default_neighbours_per_edit(n_edits: int) -> int:
    """How many neighbour subjects each edit's prompt is asked of in a batch of `n_edits`, when not given."""
    return max(1, min(NEIGHBOURS_PER_EDIT, NEIGHBOURS_SCALE ** 2 // max(n_edits, 1) ** 2))


def neighbours_default_text() -> str:
    """The default of --neighbours-per-edit in words, for its help and its error message."""
    # The rule's own bounds: (S / n)^2 >= 10 up to n = isqrt(S^2 // 10); (S / n)^2 < 2 from isqrt(S^2 // 2) + 1.
    most = math.isqrt(NEIGHBOURS_SCALE ** 2 // NEIGHBOURS_PER_EDIT)
    one = math.isqrt(NEIGHBOURS_SCALE ** 2 // 2) + 1
    return (f"{NEIGHBOURS_PER_EDIT}, fewer in batches of over {most} edits (({NEIGHBOURS_SCALE:,} / edits)^2: "
            f"{default_neighbours_per_edit(500)} at 500, 1 from {one})")


def parse_layers(value: str | None) -> list[int] | None:
    """Layers as `--layers` takes them: a list like 4,5,6,7,8 or a range like 4-8."""
    if not value:
        return None
    try:
        if "-" in value and "," not in value:
            a, b = map(int, value.split("-"))
        else:
            return [int(x) for x in value.split(",")]
    except ValueError as e:
        raise MemitError(f"--layers {value!r}: expected a list like 4,5,6,7,8 or a range like 4-8") from e
    if not 0 < b - a + 1 <= MAX_LAYERS:  # checked before the list is built: 1-99999999999999 ran out of memory
        raise MemitError(f"--layers {value!r}: a range runs upward over at most {MAX_LAYERS} layers, e.g. 4-8")
    return list(range(a, b + 1))


def derived_layers(n_layers: int) -> list[int]:
    """Five consecutive early-middle layers (the published choices sit at 11-35% of depth)."""
    count = min(5, max(1, n_layers // 6)) if n_layers >= 12 else min(2, n_layers)
    start = min(round(0.13 * n_layers), n_layers - count)
    return list(range(start, start + count))


def default_hparams(model_type: str, n_layers: int, d_ff: int, on_stack: bool = False,
                    n_edits: int | None = None, own_lambda: bool = False) -> tuple[HParams, str]:
    """Preset for a known model size (its variant for a patch made on a stack when `on_stack`; for one batch
    of `n_edits` when given: its lambda, unless the user brings their own, and its refinement steps), else
    derived defaults; also says where they came from."""
    for p in PRESETS:
        if (p.model_type, p.n_layers, p.d_ff) == (model_type, n_layers, d_ff):
            hp = HParams(layers=list(p.layers), mom2_update_weight=p.mom2_update_weight, v_lr=p.v_lr,
                         v_num_grad_steps=p.v_num_grad_steps).replace(**p.recipe)
            if on_stack and p.on_stack:
                return hp.replace(**p.on_stack), f"{p.source}, on a stack"
            source = p.source
            factor = batch_lambda_factor(p.small_batch_lambda, n_edits) if n_edits and not own_lambda else 1.0
            if factor != 1.0:
                hp = hp.replace(mom2_update_weight=round(p.mom2_update_weight * factor))
                source += f", lambda x{factor:.2f} for {n_edits:,} edits"
            reached = [(n, steps) for n, steps in p.refine_by_batch if n_edits is not None and n_edits >= n]
            if reached:
                n, steps = reached[-1]
                hp = hp.replace(refine_steps=steps)
                source += f", refined over {steps} steps (batches of {n}+ edits)"
            return hp, source
    hp = HParams(layers=derived_layers(n_layers), mom2_update_weight=LAMBDA_PER_DFF * d_ff)
    return hp, f"derived: layers at 13% of depth, lambda = {LAMBDA_PER_DFF} x d_ff ({d_ff})"


HPARAMS_MAX_BYTES = 1 << 20  # an hparams file is a few dozen names: anything larger is not one


def load_hparams_file(path: str | Path) -> dict:
    """A JSON or YAML file in the reference's format (module-template keys are ignored), or the same mapping
    given inline as JSON ('{"mom2_update_weight": 768}': a value that starts with "{" and names no file)."""
    text = str(path)
    if not _names_a_file(text):
        if text.lstrip().startswith("{"):
            return _hparams_mapping(text, "--hparams JSON", partial(parse_json, what="--hparams JSON"))
        raise MemitError(f"hparams file {path} does not exist: give a JSON or YAML file, or the JSON mapping "
                         "itself ('{\"mom2_update_weight\": 768}')")
    label = f"hparams file {path}"
    raw = read_text_file(Path(text), label, HPARAMS_MAX_BYTES, fix="an hparams file is a mapping of names to values")
    if Path(text).suffix in (".yaml", ".yml"):
        return _hparams_mapping(raw, label, _yaml_unique_keys)
    return _hparams_mapping(raw, label, partial(parse_json, what=label))


def _yaml_unique_keys(text: str):
    """yaml.safe_load, refusing a mapping that names a key twice (YAML keeps the last one unseen)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                                key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=Loader)  # a SafeLoader: no Python objects


def _names_a_file(path: str) -> bool:
    """Whether anything is at `path`; a value too long to be a file name names none (not an OSError)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def _hparams_mapping(text: str, what: str, parse) -> dict:
    try:
        data = parse(text)
    except MemitError:
        raise
    except Exception as e:
        mark = getattr(e, "problem_mark", None)  # YAML's message runs over lines, quoting the text: one line here
        reason = f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})" if mark and e.problem else e
        raise MemitError(f"{what} cannot be parsed: {reason}") from e
    if not isinstance(data, dict):
        raise MemitError(f"{what} must hold a mapping of names to values")
    return {k: v for k, v in data.items() if k not in _REFERENCE_ONLY_KEYS}
