"""Independent float64 formulas the tests compare against: written from DESIGN.md's math with
plain tensor ops and Python loops, sharing no code with recpeft."""

from __future__ import annotations

import torch


def naive_lora_linear(x, W, b, A, B, scale, keep_mask=None):
    """x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ with d(x) = x ⊙ keep_mask."""
    dropped = x if keep_mask is None else x * keep_mask
    y = x @ W.t() + (0 if b is None else b)
    return y + scale * (dropped @ A.t()) @ B.t()


def naive_bag(bags, E, A, B, scale, mode="sum", weights=None, padding_idx=None):
    """One output row per bag: Σ w_i·E[i] + s·(Σ w_i·A[i])·B; mean divides by the number of
    non-padding ids; padding ids contribute nothing; empty bags are zero."""
    rows = []
    for j, ids in enumerate(bags):
        kept = [(k, i) for k, i in enumerate(ids) if i != padding_idx]
        pooled_e = E.new_zeros(E.shape[1])
        pooled_a = A.new_zeros(A.shape[1])
        for k, i in kept:
            w = 1.0 if weights is None else weights[j][k]
            pooled_e = pooled_e + w * E[i]
            pooled_a = pooled_a + w * A[i]
        if mode == "mean" and kept:
            pooled_e, pooled_a = pooled_e / len(kept), pooled_a / len(kept)
        rows.append(pooled_e + scale * pooled_a @ B)
    return torch.stack(rows) if rows else E.new_zeros(0, E.shape[1])


def leaf64(t):
    return t.detach().double().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Tolerances from an error bound
# ---------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n = n·u/(1 − n·u), u the unit roundoff of dtype (2^-24 for float32)."""
    u = UNIT_ROUNDOFF[dtype]
    assert n * u < 1, f"γ_{n} is undefined for {dtype}"
    return n * u / (1 - n * u)


def abs_twin(module: torch.nn.Module, dtype: torch.dtype | None = torch.float64) -> torch.nn.Module:
    """A deep copy of module (in dtype; None keeps it) with every floating parameter and buffer
    replaced by its absolute value: run on absolute inputs it evaluates the bound that
    `assert_within_bound` takes (see there). Adapter scalings s = α/r are positive in every
    config the tests use. A float32 twin (for modules that only run in float32, like torchrec's
    collections) sums non-negative terms, so it is within a factor 1 ± γ_n of the exact bound,
    well inside the margin of the generously counted n."""
    import copy

    twin = copy.deepcopy(module)
    if dtype is not None:
        twin = twin.to(dtype)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point():
                t.abs_()
    twin.zero_grad(set_to_none=True)
    return twin


def abs_inputs(*tensors):
    """Floating tensors → |t| in float64 (ids, offsets and masks unchanged)."""
    return tuple(t.detach().double().abs() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors)


def dense_grad(t):
    return None if t is None else (t.to_dense() if t.is_sparse else t)


def bound_violations(got, expected, bound, n, dtype=torch.float32, computed=2):
    """Boolean mask of elements with |got − expected| > computed·γ_n·bound (NaN counts)."""
    got, expected, bound = (dense_grad(t).detach().double().cpu() for t in (got, expected, bound))
    limit = computed * gamma(n, dtype) * bound
    return ~((got - expected).abs() <= limit), limit


# Roundings along the longest chain of tests/toy_models.TinyRecommender (assert_within_bound), r ≤ 4:
# history bag: pooled A over 5 ids, /5, ·B (r), ·s, + pooled E: 12; mlp.0: A·x (24), ·B (r), ·s,
# + W·x + b: 31; mlp.2 (16 inputs) likewise: 23. Merging W' = W + s·B·A adds r + 2 per layer.
TINY_FORWARD_ROUNDINGS = 12 + 31 + 23 + 3 * (4 + 2)


def assert_within_bound(got, expected, bound, n, dtype=torch.float32, computed=2, name="value"):
    """Assert |got − expected| ≤ computed·γ_n·bound element by element.

    The bound. In floating point with unit roundoff u, every operation returns
    fl(a ∘ b) = (a ∘ b)(1 + δ), |δ| ≤ u (Higham, Accuracy and Stability of Numerical Algorithms,
    §2.2). A sum of n terms in ANY order (sequential, pairwise, blocked, vectorised, split over
    threads, FMA or not) gives Σ tᵢ·Π(1 + δ) with at most n factors per term, and
    Π_{k≤n}(1 + δ_k)^{±1} = 1 + θ_n with |θ_n| ≤ γ_n = n·u/(1 − n·u) (Higham, Lemma 3.1), so
    |fl(Σ tᵢ) − Σ tᵢ| ≤ γ_n·Σ|tᵢ|; a dot product of length k is a sum of k products (n = k).
    A whole forward and backward pass built of sums, products, exact gathers, divisions by exact
    counts, and ReLU (polynomial on a fixed activation pattern) expands to a sum of monomials of
    parameters and inputs, each carrying at most n rounding factors: a sum of k terms adds k
    to its terms' counts, a product adds its two factors' counts and 1 (so a gradient of Σ y²,
    2·y·∂y/∂θ summed over the batch, counts about twice the forward plus the batch). n is that
    count for the longest chain, counted generously in each test. Hence
        |computed − exact| ≤ γ_n · Σ|monomials| = γ_n · bound,
    and bound is the same computation on absolute values: `abs_twin(model)` on
    `abs_inputs(...)` (its ReLUs are identities, which only adds terms, and its autograd gives
    the absolute-value gradient polynomial). Being componentwise it is tight per element yet
    immune to cancellation; being relative to Σ|terms|, a wrong adapter, a missing term or a
    zeroed result (errors of the order of the terms themselves) still fails it.

    computed: how many of got/expected are floating-point results of the same exact value
    (2: two float32 runs in different orders, each within γ_n·bound of it; 1: expected is a
    float64 reference, whose own error is a γ_n of 2^-53 and negligible).
    Not valid through non-polynomial maps (sigmoid, softmax, layer norm): those tests state
    their own bound."""
    assert got is not None, f"{name}: missing"
    assert tuple(got.shape) == tuple(expected.shape), f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    bad, limit = bound_violations(got, expected, bound, n, dtype, computed)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        g, e = (dense_grad(t).reshape(bad.shape)[i].item() for t in (got, expected))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements out of bound (γ_{n}, {dtype}); "
            f"first at {list(i)}: got {g!r}, expected {e!r}, bound {limit[i].item():.3g}"
        )


def assert_bound_can_fail(expected, bound, n, dtype=torch.float32, computed=2, name="value"):
    """The negative check: a zeroed result must be out of the bound wherever the value is not
    itself within rounding of zero, and at least one element must be."""
    bad, _ = bound_violations(torch.zeros_like(dense_grad(expected)), expected, bound, n, dtype, computed)
    assert bad.any(), f"{name}: a zeroed result would pass the bound; the check cannot fail"


def assert_normwise_close(got, expected, rel: float = 2.0**-10, name="value"):
    """max|got − expected| ≤ rel·max|expected|: a discrimination floor, for the computations whose
    componentwise bound (assert_within_bound) is vacuous or does not apply: products of computed
    values (the torchrec DCN's cross layers: its absolute-value twin exceeds the true gradients by
    ~10^8, so a zeroed gradient would pass it; the basket ranker's v·u), maps that are not
    polynomial (SASRec's layer norm and softmax), training trajectories through Adam's
    normalisation. Float32 results of the same exact value differ normwise by a few γ_n·cond,
    measured ≤ 1e-6 relative (2^-20) in these tests; rel = 2^-10 leaves 1000× for other CPUs,
    BLAS kernels and thread counts, while a wrong adapter, a missing term or a zeroed tensor (an
    O(1) relative change) still fails. Where the bound applies, use it beside this."""
    got, expected = (dense_grad(t).detach().double().cpu() for t in (got, expected))
    err, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale, f"{name}: max |difference| {err:.3g} exceeds {rel:.3g}·max|expected| = {rel * scale:.3g}"


def svd_truncation_tolerance(delta: torch.Tensor, k: int, dtype: torch.dtype = torch.float64) -> float:
    """Bound on max|Δ'_k − Δ_k| between two computed rank-k truncations of Δ [m, n] (or one and
    the exact one), in ``dtype``. A backward-stable SVD is the exact SVD of Δ + E with
    ‖E‖₂ ≤ p·u·‖Δ‖₂, p a modest polynomial in m and n (taken as m·n, generously); the rank-k
    truncation then moves by at most ‖E‖₂·(1 + 2σ₁/(σ_k − σ_{k+1})) (Weyl, and Wedin's sin θ
    theorem to first order), and forming U_k·S_k·V_kᵀ rounds k·u·σ₁ more; twice that for two
    computed sides. At k ≥ the numerical rank of Δ (singular values above 2^-30·σ₁; the zero ones
    of a low-rank product compute at about u·σ₁) nothing is cut and the gap term drops. Asserts
    that a cut has a clear gap (≥ 10⁻³·σ₁), as random test deltas do."""
    m, n = delta.shape
    s = torch.linalg.svdvals(delta.detach().double())
    sigma1 = s[0].item()
    u = UNIT_ROUNDOFF[dtype]
    if k >= int((s > 2.0**-30 * sigma1).sum()):
        return 2 * (m * n + k) * u * sigma1
    gap = (s[k - 1] - s[k]).item()
    assert gap > 1e-3 * sigma1, f"singular values {s.tolist()} have no clear gap at k={k}"
    return 2 * (m * n * u * sigma1 * (1 + 2 * sigma1 / gap) + k * u * sigma1)
