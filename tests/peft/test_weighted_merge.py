"""PeftModel.add_weighted_adapter against float64 formulas written here: "cat" and one-adapter
"linear" are the weighted sum of deltas, several-adapter "linear" is HF PEFT's factor sum (cross
terms included), "svd" is the best rank-k approximation of the weighted sum (torch.linalg.svd of
it), ties / DARE / magnitude pruning follow a numpy implementation of their formulas (DARE's masks
redrawn from the documented seed and order); row-sparse tables merge on the union of touched rows;
the merged adapter saves and reloads; torchrec collections merge table by table; bad arguments are
one-line errors that leave the model as it was."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.peft import WEIGHTS_NAME

from reference_math import assert_normwise_close, assert_within_bound, svd_truncation_tolerance
from toy_models import ALL_TARGETS, NUM_ITEMS, make_batch, make_model

TABLES = ("history", "item")  # Δ = s·A·B [V, D]; the other targets are Linear: Δ = s·B·A [N, K]
#: adapter → (r, α, rsLoRA): unequal ranks and scales, rsLoRA on one
SPECS = {"de": (2, 4.0, False), "fr": (3, 3.0, True), "es": (2, 8.0, False)}
EQUAL_RANKS = {"de": (2, 4.0, False), "fr": (2, 3.0, True), "es": (2, 8.0, False)}
WEIGHTS = [0.5, -0.3, 1.2]  # a negative weight: HF PEFT puts its sign on A
TOUCHED = 12  # rows each adapter touches in a table of NUM_ITEMS


def _scale(spec) -> float:
    r, alpha, rslora = spec
    return alpha / math.sqrt(r) if rslora else alpha / r


def _model(specs=SPECS, seed=0, targets=ALL_TARGETS):
    """float64 TinyRecommender with one adapter per spec, random A and B; in a table each adapter
    touches TOUCHED random rows (the others of its A are zero). Returns (model, touched rows)."""
    model = make_model(seed).double()
    peft = None
    for name, (r, alpha, rslora) in specs.items():
        config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets))
        if peft is None:
            peft = get_peft_model(model, config, name)
        else:
            peft.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed + 100)
    touched = {}
    with torch.no_grad():
        for layer_name, layer in peft.lora_layers().items():
            for name in specs:
                a, b = layer.lora_A[name], layer.lora_B[name]
                a.copy_(torch.randn(a.shape, generator=g, dtype=torch.float64))
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64))
                if layer_name in TABLES:
                    rows = torch.randperm(NUM_ITEMS, generator=g)[:TOUCHED].sort().values
                    keep = torch.zeros(NUM_ITEMS, dtype=torch.bool)
                    keep[rows] = True
                    a[~keep] = 0.0
                    touched[layer_name, name] = rows
    return peft, touched


def _delta(layer_name, a, b, scale):
    """The full update in float64: s·A·B for a table, s·B·A for a Linear layer."""
    a, b = a.detach().double(), b.detach().double()
    return scale * (a @ b if layer_name in TABLES else b @ a)


def _adapter_delta(peft, layer_name, adapter, spec):
    layer = peft.lora_layers()[layer_name]
    return _delta(layer_name, layer.lora_A[adapter], layer.lora_B[adapter], _scale(spec))


def _merged_delta(peft, layer_name, adapter="m"):
    layer = peft.lora_layers()[layer_name]
    assert layer.scaling[adapter] == 1.0  # α = r, no rsLoRA
    return _delta(layer_name, layer.lora_A[adapter], layer.lora_B[adapter], 1.0)


def _abs_sum(peft, layer_name, specs, weights):
    """Σ|w_i s_i|·|factors|·|factors|: the bound of a weighted sum of deltas (reference_math)."""
    layer = peft.lora_layers()[layer_name]
    return sum(
        abs(w * _scale(spec)) * _delta(layer_name, layer.lora_A[n].abs(), layer.lora_B[n].abs(), 1.0)
        for (n, spec), w in zip(specs.items(), weights)
    )


def _weighted_sum(peft, layer_name, specs, weights):
    return sum(w * _adapter_delta(peft, layer_name, n, spec) for (n, spec), w in zip(specs.items(), weights))


def _union(touched, layer_name, names):
    return torch.from_numpy(functools.reduce(np.union1d, [touched[layer_name, n].numpy() for n in names]))


# ---------------------------------------------------------------------------------------------
# cat, linear


def test_cat_is_the_weighted_sum_of_deltas_and_the_merged_model_runs_it():
    peft, _ = _model()
    peft.add_weighted_adapter(list(SPECS), WEIGHTS, "m", combination_type="cat")
    assert peft.peft_config["m"].adapted_modules["mlp.0"] == {"r": 7, "lora_alpha": 7}  # Σ r_i
    for layer_name in ALL_TARGETS:
        # got: B'·A' (Σr = 7 products summed) of w·s·A (2 roundings); expected: s·(B·A) (r + 1),
        # ·w, a sum of 3 deltas: n = 7 + 2 + 3 + 3 counts each chain generously
        assert_within_bound(
            _merged_delta(peft, layer_name),
            _weighted_sum(peft, layer_name, SPECS, WEIGHTS),
            _abs_sum(peft, layer_name, SPECS, WEIGHTS),
            n=15,
            dtype=torch.float64,
            name=layer_name,
        )
    # the model with the merged adapter = the base with Σ w_i·Δ_i added to its weights
    reference = make_model(0).double()
    with torch.no_grad():
        for layer_name in ALL_TARGETS:
            reference.get_submodule(layer_name).weight.add_(_weighted_sum(peft, layer_name, SPECS, WEIGHTS))
    peft.set_adapter("m")
    batch = make_batch(seed=5)
    batch = (batch[0], batch[1], batch[2].double())
    # float64 through 3 layers of O(1) values: ~100 roundings of 2^-53 against a wrong or
    # missing delta's O(1) change; 2^-30 is far from both
    assert_normwise_close(peft(*batch), reference(*batch), rel=2.0**-30, name="output")


def test_linear_of_one_adapter_is_its_weighted_delta():
    spec = {"fr": SPECS["fr"]}
    peft, _ = _model(spec)
    peft.add_weighted_adapter(["fr"], [-0.7], "m", combination_type="svd", svd_rank=1)  # one adapter: linear
    assert peft.peft_config["m"].adapted_modules["item"]["r"] == 3  # not truncated to 1
    for layer_name in ALL_TARGETS:
        assert_within_bound(
            _merged_delta(peft, layer_name),
            _weighted_sum(peft, layer_name, spec, [-0.7]),
            _abs_sum(peft, layer_name, spec, [-0.7]),
            n=10,
            dtype=torch.float64,
            name=layer_name,
        )


def test_linear_sums_the_factors_with_square_root_weights_cross_terms_included():
    peft, _ = _model(EQUAL_RANKS)
    peft.add_weighted_adapter(list(EQUAL_RANKS), WEIGHTS, "m", combination_type="linear")
    layers = peft.lora_layers()
    for layer_name in ALL_TARGETS:
        layer = layers[layer_name]
        alphas = [w * _scale(spec) for spec, w in zip(EQUAL_RANKS.values(), WEIGHTS)]
        a = sum(math.copysign(math.sqrt(abs(x)), x) * layer.lora_A[n].double() for n, x in zip(EQUAL_RANKS, alphas))
        b = sum(math.sqrt(abs(x)) * layer.lora_B[n].double() for n, x in zip(EQUAL_RANKS, alphas))
        bound_a = sum(math.sqrt(abs(x)) * layer.lora_A[n].double().abs() for n, x in zip(EQUAL_RANKS, alphas))
        bound_b = sum(math.sqrt(abs(x)) * layer.lora_B[n].double().abs() for n, x in zip(EQUAL_RANKS, alphas))
        # each factor: 3 weighted terms (sqrt, product, sum: 3 roundings each)
        assert_within_bound(layer.lora_A["m"], a, bound_a, n=6, dtype=torch.float64, name=f"{layer_name} A")
        assert_within_bound(layer.lora_B["m"], b, bound_b, n=6, dtype=torch.float64, name=f"{layer_name} B")
        # and that is not Σ w_i·Δ_i: the cross terms B_i·A_j are there (HF PEFT's approximation)
        exact = _weighted_sum(peft, layer_name, EQUAL_RANKS, WEIGHTS)
        assert (_merged_delta(peft, layer_name) - exact).abs().max() > 1e-3 * exact.abs().max()


# ---------------------------------------------------------------------------------------------
# svd


def _best_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


@pytest.mark.parametrize("rank", [None, 2, 16], ids=["max_r", "rank_2", "full_rank"])
def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum(rank):
    peft, touched = _model()
    peft.add_weighted_adapter(list(SPECS), WEIGHTS, "m", combination_type="svd", svd_rank=rank)
    k = rank or 3  # default: the largest rank
    for layer_name in ALL_TARGETS:
        exact = _weighted_sum(peft, layer_name, SPECS, WEIGHTS)  # full [V, D] for a table
        got = _merged_delta(peft, layer_name)
        assert peft.peft_config["m"].adapted_modules[layer_name]["r"] == k
        err = (got - _best_rank(exact, k)).abs().max().item()
        assert err <= svd_truncation_tolerance(exact, k), f"{layer_name}: {err:.3g}"
        if k < min(7, *exact.shape):  # below the rank of the sum (Σ r_i = 7): truncation cut something
            assert (got - exact).abs().max() > 1e-3 * exact.abs().max()
        if layer_name in TABLES:  # rows no adapter touched stay zero
            outside = torch.ones(NUM_ITEMS, dtype=torch.bool)
            outside[_union(touched, layer_name, SPECS)] = False
            assert not peft.lora_layers()[layer_name].lora_A["m"][outside].any()


# ---------------------------------------------------------------------------------------------
# ties, DARE, magnitude pruning: numpy, written from the formulas


def np_magnitude(t: np.ndarray, density: float, stored: int) -> np.ndarray:
    """Keep the ⌊density·stored⌋ entries of largest |t| (stored: the entries the adapter holds)."""
    k = int(density * stored)
    order = np.argsort(-np.abs(t).ravel(), kind="stable")
    keep = np.zeros(t.size, dtype=bool)
    keep[order[:k]] = True
    return np.where(keep.reshape(t.shape), t, 0.0)


def np_rule(rule, tensors, weights, density, method, uniforms, stored=None):
    if rule in ("ties", "magnitude_prune"):
        stored = stored or [t.size for t in tensors]
        tensors = [np_magnitude(t, density, n) for t, n in zip(tensors, stored)]
    if rule in ("dare_linear", "dare_ties"):
        tensors = [np.where(u < density, t / density, 0.0) for t, u in zip(tensors, uniforms)]
    if rule not in ("ties", "dare_ties"):
        return sum(w * t for w, t in zip(weights, tensors)), sum(abs(w) * np.abs(t) for w, t in zip(weights, tensors))
    votes = sum(t if method == "total" else np.sign(t) for t in tensors)
    elected = np.where(votes >= 0, 1.0, -1.0)
    total, count, bound = np.zeros_like(tensors[0]), np.zeros_like(tensors[0]), np.zeros_like(tensors[0])
    for w, t in zip(weights, tensors):
        agree = np.sign(t) == elected
        total += np.where(agree, w * t, 0.0)
        bound += np.where(agree, abs(w * t), 0.0)
        count += agree
    return total / np.maximum(count, 1), bound / np.maximum(count, 1)


def _aligned_factors(peft, touched, layer_name, names):
    """Each adapter's (A, B) as float64 numpy; a table's A on the union of touched rows."""
    layer = peft.lora_layers()[layer_name]
    out = []
    for n in names:
        a, b = layer.lora_A[n].detach().double(), layer.lora_B[n].detach().double()
        if layer_name in TABLES:
            a = a[_union(touched, layer_name, names)]
        out.append((a.numpy(), b.numpy()))
    return out


FACTOR_RULES = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]


PRUNING_CASES = [(c, "total") for r in FACTOR_RULES for c in (r, r + "_svd")] + [
    (c, "frequency") for c in ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
]


@pytest.mark.parametrize(("combination", "method"), PRUNING_CASES, ids=[f"{c}-{m}" for c, m in PRUNING_CASES])
def test_pruning_rules_follow_their_formulas(combination, method):
    specs = EQUAL_RANKS if not combination.endswith("_svd") else SPECS
    peft, touched = _model(specs, seed=3)
    density, seed, names = 0.4, 11, list(specs)
    full = 16  # ≥ every target's min(m, n): the _svd forms keep the whole combined delta
    svd_rank = full if combination.endswith("_svd") else None
    peft.add_weighted_adapter(
        names, WEIGHTS, "m", combination, svd_rank=svd_rank, density=density, majority_sign_method=method, seed=seed
    )
    rule = combination.removesuffix("_svd")
    g = torch.Generator().manual_seed(seed)  # the documented draw order: targets, A_i then B_i (or Δ_i)
    draw = lambda shape: torch.rand(shape, dtype=torch.float64, generator=g).numpy()  # noqa: E731
    layers = peft.lora_layers()
    for layer_name in ALL_TARGETS:  # the model's order
        factors = _aligned_factors(peft, touched, layer_name, names)
        scales = [_scale(spec) for spec in specs.values()]
        union = _union(touched, layer_name, names) if layer_name in TABLES else None
        layer = layers[layer_name]
        merged_a = layer.lora_A["m"].detach()
        if union is not None:
            outside = torch.ones(NUM_ITEMS, dtype=torch.bool)
            outside[union] = False
            assert not merged_a[outside].any(), f"{layer_name}: rows outside the union"
            merged_a = merged_a[union]
        if combination.endswith("_svd"):
            deltas = [s * (a @ b if union is not None else b @ a) for (a, b), s in zip(factors, scales)]
            uniforms = [draw(d.shape) for d in deltas] if "dare" in rule else None
            stored = [TOUCHED * d.shape[1] for d in deltas] if union is not None else None  # its rows only
            expected, bound = np_rule(rule, deltas, WEIGHTS, density, method, uniforms, stored)
            got = _delta(layer_name, merged_a, layer.lora_B["m"], 1.0)
            expected = torch.from_numpy(expected)  # kept whole: svd_rank ≥ min(m, n)
            assert (got - expected).abs().max().item() <= svd_truncation_tolerance(expected, full), layer_name
            continue
        alphas = [w * s for w, s in zip(WEIGHTS, scales)]
        uniforms_a = [draw(a.shape) for a, _ in factors] if "dare" in rule else None
        uniforms_b = [draw(b.shape) for _, b in factors] if "dare" in rule else None
        weights_a = [math.copysign(math.sqrt(abs(x)), x) for x in alphas]
        weights_b = [math.sqrt(abs(x)) for x in alphas]
        stored_a = [TOUCHED * a.shape[1] for a, _ in factors] if union is not None else None
        for got, tensors, weights, uniforms, stored, which in (
            (merged_a, [a for a, _ in factors], weights_a, uniforms_a, stored_a, "A"),
            (layer.lora_B["m"], [b for _, b in factors], weights_b, uniforms_b, None, "B"),
        ):
            expected, bound = np_rule(rule, tensors, weights, density, method, uniforms, stored)
            # elementwise: a /d, ·w, a sum or mean of 3 terms: a handful of roundings
            assert_within_bound(
                got,
                torch.from_numpy(expected),
                torch.from_numpy(bound),
                n=8,
                dtype=torch.float64,
                name=f"{layer_name} {which}",
            )
            plain = sum(w * t for w, t in zip(weights, tensors))
            assert not np.allclose(expected, plain), "the rule should differ from the plain weighted sum"


def test_dare_is_reproducible_from_its_seed():
    def merged(seed):
        peft, _ = _model(EQUAL_RANKS)
        peft.add_weighted_adapter(list(EQUAL_RANKS), WEIGHTS, "m", "dare_ties", density=0.5, seed=seed)
        return peft.adapter_state_dict("m")

    first, again, other = merged(7), merged(7), merged(8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# row-sparse tables, files


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_row_sparse_tables_merge_on_the_union_of_touched_rows_and_save_only_those(combination, tmp_path):
    specs = EQUAL_RANKS if combination == "linear" else SPECS
    peft, touched = _model(specs, seed=1)
    peft.add_weighted_adapter(list(specs), WEIGHTS, "m", combination, svd_rank=8 if combination == "svd" else None)
    peft.save_pretrained(tmp_path, selected_adapters=["m"])
    tensors = load_file(str(tmp_path / "m" / WEIGHTS_NAME))
    for layer_name in TABLES:
        union = _union(touched, layer_name, specs)
        assert 0 < union.numel() < NUM_ITEMS and union.numel() > TOUCHED  # overlapping, not all rows
        layer = peft.lora_layers()[layer_name]
        assert torch.equal(layer.touched_rows("m"), union)
        assert torch.equal(tensors[f"base_model.model.{layer_name}.lora_embedding_A.indices"], union)
        assert torch.equal(
            tensors[f"base_model.model.{layer_name}.lora_embedding_A.rows"], layer.lora_A["m"][union].detach()
        )
        delta = _merged_delta(peft, layer_name)
        outside = torch.ones(NUM_ITEMS, dtype=torch.bool)
        outside[union] = False
        assert not delta[outside].any() and delta[union].abs().min(1).values.gt(0).all()


def test_the_saved_merged_adapter_reloads_with_the_same_outputs(tmp_path):
    peft, _ = _model()
    peft.add_weighted_adapter(list(SPECS), WEIGHTS, "m", combination_type="svd", svd_rank=4)
    peft.set_adapter("m")
    batch = make_batch(seed=9)
    batch = (batch[0], batch[1], batch[2].double())
    expected = peft(*batch)
    assert not torch.allclose(expected, make_model(0).double()(*batch))  # the adapter matters
    peft.save_pretrained(tmp_path, selected_adapters=["m"])
    loaded = PeftModel.from_pretrained(make_model(0).double(), tmp_path / "m")
    assert loaded.peft_config["default"].adapted_modules == {t: {"r": 4, "lora_alpha": 4} for t in ALL_TARGETS}
    assert torch.equal(loaded(*batch), expected)  # the same weights through the same ops


def test_torchrec_collection_tables_merge_table_by_table():
    torchrec_models = pytest.importorskip("torchrec_models")
    from torchrec import EmbeddingBagCollection

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.coll = EmbeddingBagCollection(torchrec_models.table_configs())

        def forward(self, features):
            return self.coll(features)

    tables = ["t_user", "t_item"]
    peft = get_peft_model(Holder(), LoraConfig(r=2, lora_alpha=4, target_modules=tables), "de")
    peft.add_adapter("fr", LoraConfig(r=3, lora_alpha=3, target_modules=tables))
    g = torch.Generator().manual_seed(2)
    layer = peft.lora_layers()["coll"]
    touched = {}
    with torch.no_grad():
        for name in ("de", "fr"):
            for t in tables:
                a, b = layer.adapter_table(name, t), layer.lora_B[name][t]
                rows = torch.randperm(a.shape[0], generator=g)[:20].sort().values
                a.zero_()[rows] = torch.randn(20, a.shape[1], generator=g)
                b.copy_(torch.randn(b.shape, generator=g))
                touched[name, t] = rows
    weights = [0.6, -0.4]
    peft.add_weighted_adapter(["de", "fr"], weights, "m", combination_type="cat")
    for t in tables:
        exact = sum(
            w * s * (layer.adapter_table(n, t).detach().double() @ layer.lora_B[n][t].detach().double())
            for n, s, w in (("de", 2.0, weights[0]), ("fr", 1.0, weights[1]))
        )
        bound = sum(
            abs(w * s)
            * (layer.adapter_table(n, t).detach().double().abs() @ layer.lora_B[n][t].detach().double().abs())
            for n, s, w in (("de", 2.0, weights[0]), ("fr", 1.0, weights[1]))
        )
        got = layer.adapter_table("m", t).detach() @ layer.lora_B["m"][t].detach()  # float32, scale 1
        assert layer.scaling["m"][t] == 1.0 and layer.ranks["m"][t] == 5
        # float32 tables: got rounds w·s·A (2) and a 5-term product (5); exact is float64
        assert_within_bound(got, exact, bound, n=10, dtype=torch.float32, computed=1, name=t)
        union = torch.from_numpy(np.union1d(touched["de", t].numpy(), touched["fr", t].numpy()))
        rows = (layer.adapter_table("m", t) != 0).any(1).nonzero().squeeze(1)
        assert torch.equal(rows, union)


# ---------------------------------------------------------------------------------------------
# errors


def _error_cases():
    return {
        "unknown adapter": (dict(adapters=["de", "xx"]), "unknown adapter 'xx'"),
        "existing name": (dict(adapter_name="fr"), "'fr' already exists"),
        "weights length": (dict(weights=[1.0]), "weights must be a list of 3"),
        "weight not finite": (dict(weights=[1.0, float("nan"), 1.0]), "finite"),
        "combination type": (dict(combination_type="average"), "combination_type must be one of"),
        "linear, unequal ranks": (dict(combination_type="linear"), "needs equal ranks, but history has"),
        "density 0": (dict(combination_type="ties_svd", density=0.0), r"density must be in \(0, 1\]"),
        "density above 1": (dict(combination_type="dare_linear_svd", density=1.5), r"density must be in \(0, 1\]"),
        "density missing": (dict(combination_type="dare_ties_svd"), "needs a density"),
        "density unused": (dict(combination_type="cat", density=0.5), "density applies to"),
        "svd_rank unused": (dict(combination_type="cat", svd_rank=2), "svd_rank applies to"),
        "svd_rank 0": (dict(svd_rank=0), "svd_rank must be a positive integer"),
        "sign method": (dict(combination_type="ties_svd", density=0.5, majority_sign_method="max"), "majority_sign"),
    }


@pytest.mark.parametrize("case", list(_error_cases()), ids=list(_error_cases()))
def test_bad_arguments_are_one_line_errors_and_change_nothing(case):
    peft, _ = _model()
    overrides, message = _error_cases()[case]
    kwargs = dict(adapters=list(SPECS), weights=WEIGHTS, adapter_name="m", combination_type="svd") | overrides
    before = peft.adapter_names
    with pytest.raises(ValueError, match=message) as error:
        peft.add_weighted_adapter(**kwargs)
    assert "\n" not in str(error.value)
    assert peft.adapter_names == before and "m" not in peft.lora_layers()["item"].lora_A


def test_adapters_of_other_modules_dora_and_modules_to_save_are_refused():
    peft, _ = _model({"de": SPECS["de"]})
    peft.add_adapter("mlp_only", LoraConfig(r=2, target_modules=["mlp.0"]))
    with pytest.raises(ValueError, match="history is adapted by 'de' but not by 'mlp_only'"):
        peft.add_weighted_adapter(["de", "mlp_only"], [1.0, 1.0], "m", "cat")
    peft.add_adapter("dora", LoraConfig(r=2, target_modules=ALL_TARGETS[2:], use_dora=True))
    with pytest.raises(ValueError, match="'dora' is a DoRA adapter"):
        peft.add_weighted_adapter(["mlp_only", "dora"], [1.0, 1.0], "m", "cat")
    assert peft.adapter_names == ("de", "mlp_only", "dora")
    saving = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["dense"], modules_to_save=["mlp.2"]), "head")
    with pytest.raises(ValueError, match=r"mlp.2 is saved whole by adapter 'head' \(modules_to_save\)"):
        saving.add_weighted_adapter(["head"], [1.0], "m", "cat")
    assert saving.adapter_names == ("head",)
