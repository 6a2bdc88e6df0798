"""add_weighted_adapter against HF PEFT's own: the same Linear adapters (saved by recpeft, loaded
into HF PEFT) combined by both libraries give the same update ΔW = s·B·A per layer and the same
outputs, for "linear", "cat", "svd" and the deterministic pruning rules (ties, magnitude
pruning, and their _svd forms). DARE draws from HF PEFT's global RNG, so it is not compared.
The SVD's factors are unique only up to signs: the updates are compared, not the factors."""

from __future__ import annotations

import pytest
import torch

from recpeft import LoraConfig, get_peft_model

from reference_math import assert_normwise_close, assert_within_bound, svd_truncation_tolerance
from toy_models import make_batch, make_model

# not mlp.2 (16 → 1): for an SVD rank above min(N, K) HF PEFT keeps fewer columns of U than rows of
# Vᵀ and its get_delta_weight fails; recpeft pads both with zeros (tests/peft/test_weighted_merge.py)
LINEAR = ["dense", "mlp.0"]
NO_PEFT = "peft (HF PEFT) is not installed: pip install peft"
WEIGHTS = [0.7, -0.4]
#: combination → (ranks of the two adapters, extra arguments)
CASES = {
    "linear": ((2, 2), {}),
    "cat": ((2, 3), {}),
    "svd": ((2, 3), {}),
    "svd_rank_1": ((2, 3), {"svd_rank": 1}),
    "ties": ((2, 2), {"density": 0.5}),
    "ties_frequency": ((2, 2), {"density": 0.5, "majority_sign_method": "frequency"}),
    "magnitude_prune": ((2, 2), {"density": 0.6}),
    "ties_svd": ((2, 3), {"density": 0.5}),
    "magnitude_prune_svd": ((2, 3), {"density": 0.6}),
}


def _combination(case: str) -> str:
    return {"svd_rank_1": "svd", "ties_frequency": "ties"}.get(case, case)


def _both(tmp_path, ranks):
    """recpeft with adapters "de", "fr" (random A and B, α ≠ r) on the Linear layers, and HF PEFT
    with the same two adapters read from recpeft's files."""
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    ours = None
    for name, r, alpha in zip(("de", "fr"), ranks, (4.0, 3.0)):
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=LINEAR, init_lora_weights=False)
        ours = get_peft_model(make_model(), config, name) if ours is None else ours
        if name != "de":
            ours.add_adapter(name, config)
    ours.save_pretrained(tmp_path)
    theirs = hf_peft.PeftModel.from_pretrained(make_model(), tmp_path / "de", adapter_name="de")
    theirs.load_adapter(tmp_path / "fr", adapter_name="fr")
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_recpeft_and_hf_peft_combine_adapters_the_same_way(tmp_path, case):
    ranks, extra = CASES[case]
    ours, theirs = _both(tmp_path, ranks)
    combination = _combination(case)
    ours.add_weighted_adapter(["de", "fr"], WEIGHTS, "m", combination_type=combination, **extra)
    theirs.add_weighted_adapter(["de", "fr"], WEIGHTS, "m", combination_type=combination, **extra)
    hf_layers = dict(theirs.named_modules())
    for name in LINEAR:
        layer = ours.lora_layers()[name]
        got = layer.lora_B["m"] @ layer.lora_A["m"] * layer.scaling["m"]
        expected = hf_layers[f"base_model.model.{name}"].get_delta_weight("m")
        if combination.endswith("svd"):
            # both: a float32 SVD of the same combined update, truncated at the same k
            k = extra.get("svd_rank", max(ranks))
            tol = svd_truncation_tolerance(expected, min(k, *expected.shape), dtype=torch.float32)
            assert (got - expected).abs().max().item() <= tol, name
        else:
            # factor rules: A' and B' are (pruned) sums of the factors weighted by √|α_i|, α_i = w_i·s_i,
            # so |B'|·|A'| ≤ (Σ √|α_i|·|B_i|)·(Σ √|α_i|·|A_i|); cat stacks α_i·A_i against B_i, so
            # |B'|·|A'| = Σ |α_i|·|B_i|·|A_i|. Each side rounds each factor ≤ 4 times (√, weights,
            # sum, ties' mean) and the product r' + 1 more: n = r' + 9, two float32 computations
            alphas = {a: abs(w) * layer.scaling[a] for a, w in zip(("de", "fr"), WEIGHTS)}
            abs_b = {a: layer.lora_B[a].detach().abs() for a in alphas}
            abs_a = {a: layer.lora_A[a].detach().abs() for a in alphas}
            if combination == "cat":
                bound = sum(alphas[a] * abs_b[a] @ abs_a[a] for a in alphas)
            else:
                bound = sum(alphas[a] ** 0.5 * abs_b[a] for a in alphas) @ sum(
                    alphas[a] ** 0.5 * abs_a[a] for a in alphas
                )
            r_new = layer.lora_A["m"].shape[0]
            assert_within_bound(got.detach(), expected.detach(), bound, n=r_new + 9, name=name)
    ours.set_adapter("m")
    theirs.set_adapter("m")
    batch = make_batch(seed=3)
    with torch.no_grad():
        expected = theirs(*batch)
        assert not torch.allclose(expected, make_model()(*batch), atol=1e-4)  # the merged adapter matters
        assert_normwise_close(ours(*batch), expected, name="output")
