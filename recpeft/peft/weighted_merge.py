"""Weighted combinations of LoRA adapters: ``PeftModel.add_weighted_adapter`` (HF PEFT's meaning).

Per target (a module, or one table of a torchrec collection), adapters i = 1..n have factors
A_i, B_i, scale s_i and weight w_i; their updates are Δ_i = s_i·B_i·A_i for a Linear layer
(A [r, K], B [N, r]) and Δ_i = s_i·A_i·B_i for a table (A [V, r], B [r, D]); α_i = w_i·s_i. The new
adapter has scale 1 (α = r, no rsLoRA) and, by ``combination_type``:

cat      A' = [α_1·A_1, …, α_n·A_n], B' = [B_1, …, B_n], stacked along the rank: rank Σ r_i and
         Δ' = Σ_i w_i·Δ_i exactly.
linear   equal ranks r: A' = Σ_i sgn(α_i)·√|α_i|·A_i, B' = Σ_i √|α_i|·B_i, rank r. Then
         Δ' = Σ_i Σ_j sgn(α_j)·√|α_i·α_j|·B_i·A_j: the w_i·Δ_i plus the cross terms i ≠ j, so it
         is Σ w_i·Δ_i only for one adapter (HF PEFT calls it "a very rough approximation").
ties, dare_linear, dare_ties, magnitude_prune
         as linear, the plain sums of the A_i and of the B_i replaced by the rule of that name
         (below), with the same per-factor weights sgn(α_i)·√|α_i| and √|α_i|.
svd      Δ = Σ_i w_i·Δ_i and its truncated SVD Δ ≈ U_k·S_k·V_kᵀ, k = ``svd_rank`` (default: the
         largest r_i): B' = U_k·S_k, A' = V_kᵀ for a Linear layer; A' = U_k, B' = S_k·V_kᵀ for a
         table (where HF PEFT puts S). Δ' is the best rank-k approximation of Δ in the Frobenius
         and spectral norms (Eckart–Young); a k above min of Δ's dimensions pads with zeros.
ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
         the rule over the Δ_i with weights w_i in place of the sum, then the truncated SVD.

The rules, elementwise over tensors τ_i of one shape with weights λ_i, d = ``density`` ∈ (0, 1]:

sum              Σ_i λ_i·τ_i
magnitude_prune  Σ_i λ_i·P(τ_i), P keeping the ⌊d·numel⌋ entries of largest |τ_i| (tables: below), zeroing the rest
ties             τ̂_i = P(τ_i); the elected sign γ = sgn(Σ_i τ̂_i) ("total") or sgn(Σ_i sgn τ̂_i)
                 (``majority_sign_method="frequency"``), +1 where that sum is 0; m_i = [sgn τ̂_i = γ]
                 (a zero never agrees); the result Σ_i λ_i·m_i·τ̂_i / max(1, Σ_i m_i). The sign is
                 elected on the unweighted τ̂_i, as HF PEFT does.
dare_linear      τ̃_i = τ_i·[u_i < d]/d with u_i uniform in [0, 1) per entry; Σ_i λ_i·τ̃_i
dare_ties        the ties rule over the τ̃_i in place of the τ̂_i

DARE's u_i are ``torch.rand(shape, dtype=torch.float64, generator=g)`` on the CPU, g a generator
seeded with ``seed``, drawn in this order: targets in the model's order; per target, for the factor
rules every A_i then every B_i, for the _svd rules every Δ_i; i in the order of ``adapters``. The
same seed on the same adapters gives the same adapter, on any device.

One adapter: every combination is ``linear`` (HF PEFT's rule), so Δ' = w·Δ.

Tables are row-sparse: an adapter's A holds only the rows it touched. Every rule runs on the union
U of the adapters' touched rows (ascending): each A_i restricted to U (zero in the rows adapter i
did not touch) and each Δ_i as its rows U [|U|, D]. Rows outside U stay zero, so the merged adapter
touches U (less any row the combination leaves all zero). Magnitude pruning (ties,
magnitude_prune) keeps ⌊d·n_i·c⌋ entries of adapter i's A_i [.., c] or Δ_i [.., c], n_i the rows it
touched: the entries it stores, not all V·c (which would keep every touched entry of a sparse
adapter) nor those of U (which would depend on the other adapters).

Example::

    model.add_weighted_adapter(["de", "fr"], [0.6, 0.4], "de_fr", combination_type="cat")
    model.set_adapter("de_fr")
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from recpeft.layers import LoraLayer
from recpeft.layers.base import AdapterFactors
from recpeft.utils.validation import check_adapter_name, check_int

from .config import LoraBias

if TYPE_CHECKING:
    from .model import PeftModel

#: combination_type → the rule applied (to the factors, or with ``_svd`` to the deltas)
COMBINATION_TYPES = {
    "svd": "sum",
    "linear": "sum",
    "cat": "cat",
    "ties": "ties",
    "ties_svd": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "dare_linear_svd": "dare_linear",
    "magnitude_prune": "magnitude_prune",
    "magnitude_prune_svd": "magnitude_prune",
}
SIGN_METHODS = ("total", "frequency")
PRUNING_RULES = ("magnitude_prune", "ties", "dare_linear", "dare_ties")

Draw = Callable[[torch.Size], torch.Tensor]  # shape → uniform [0, 1) float64 on the CPU


# ---------------------------------------------------------------------------------------------
# the rules over tensors


def magnitude_prune(tensor: torch.Tensor, density: float, size: int | None = None) -> torch.Tensor:
    """P(τ): the ⌊density·size⌋ entries of largest |τ| kept (size: τ's entries, or the number
    that it stores when the rest are structural zeros), the others zero."""
    flat = tensor.reshape(-1)
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=tensor.device)
    keep[flat.abs().topk(int(density * (flat.numel() if size is None else size))).indices] = True
    return torch.where(keep.view(tensor.shape), tensor, 0.0)


def random_prune(tensor: torch.Tensor, density: float, uniform: torch.Tensor) -> torch.Tensor:
    """τ̃ = τ·[u < d]/d for ``uniform`` u of τ's shape."""
    return torch.where(uniform.to(tensor.device) < density, tensor / density, 0.0)


def elect_signs(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """γ = sgn(Σ_i τ_i) ("total") or sgn(Σ_i sgn τ_i) ("frequency") over dim 0, +1 where 0."""
    total = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    return torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    rule: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    draw: Draw | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """One of the rules of the module docstring (``sum``, ``magnitude_prune``, ``ties``,
    ``dare_linear``, ``dare_ties``) over ``tensors`` with ``weights``; ``sizes``: the entries
    each τ_i stores, for magnitude pruning (default: all of them)."""
    if rule in ("magnitude_prune", "ties"):
        sizes = [None] * len(tensors) if sizes is None else sizes
        tensors = [magnitude_prune(t, density, size) for t, size in zip(tensors, sizes)]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density, draw(t.shape)) for t in tensors]
    stacked = torch.stack(list(tensors))
    lam = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if rule in ("ties", "dare_ties"):
        agree = stacked.sign() == elect_signs(stacked, majority_sign_method)
        return (stacked * lam * agree).sum(0) / agree.sum(0).clamp_min(1)
    return (stacked * lam).sum(0)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k [m, k], S_k [k], V_kᵀ [k, n]) of the k = ``rank`` largest singular values of ``delta``
    [m, n]; past min(m, n) the columns of U, values of S and rows of V_kᵀ are zero."""
    m, n = delta.shape
    if min(m, n) == 0:
        u, s, vh = delta.new_zeros(m, 0), delta.new_zeros(0), delta.new_zeros(0, n)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pad = rank - s.numel()
    if pad > 0:
        u = torch.cat([u, u.new_zeros(m, pad)], 1)
        s = torch.cat([s, s.new_zeros(pad)])
        vh = torch.cat([vh, vh.new_zeros(pad, n)], 0)
    return u, s, vh


# ---------------------------------------------------------------------------------------------
# one target's factors


def is_table(factors: AdapterFactors) -> bool:
    """A table's factors list their rows (Δ = s·A·B); a Linear layer's do not (Δ = s·B·A)."""
    return factors.rows is not None


def rank_of(factors: AdapterFactors) -> int:
    return factors.lora_A.shape[1 if is_table(factors) else 0]


def delta_of(factors: AdapterFactors) -> torch.Tensor:
    """Δ = s·A·B (a table, its listed rows) or s·B·A (a Linear layer)."""
    a, b = factors.lora_A, factors.lora_B
    return (a @ b if is_table(factors) else b @ a) * factors.scale


def align_rows(factors: Sequence[AdapterFactors]) -> list[AdapterFactors]:
    """Table factors with A on the union U of their rows (ascending), zero where one did not touch."""
    union = torch.unique(torch.cat([f.rows for f in factors]))
    aligned = []
    for f in factors:
        a = f.lora_A.new_zeros(union.numel(), f.lora_A.shape[1])
        a[torch.searchsorted(union, f.rows)] = f.lora_A
        aligned.append(dataclasses.replace(f, lora_A=a, rows=union))
    return aligned


def combine_factors(
    factors: Sequence[AdapterFactors],
    weights: Sequence[float],
    combination_type: str,
    *,
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    draw: Draw | None = None,
) -> AdapterFactors:
    """The merged adapter's factors (scale 1) on one target from every adapter's ``factors``
    there, by ``combination_type`` (module docstring). ``svd_rank`` None: the largest rank.
    Computed in the factors' dtype promoted to at least float32."""
    compute = torch.promote_types(factors[0].lora_A.dtype, torch.float32)
    factors = [dataclasses.replace(f, lora_A=f.lora_A.to(compute), lora_B=f.lora_B.to(compute)) for f in factors]
    table = is_table(factors[0])
    stored = [f.rows.numel() for f in factors] if table else None  # the rows each adapter stores

    def sizes(width: int) -> list[int] | None:
        """Entries each adapter stores of a tensor ``width`` wide (all of a Linear layer's)."""
        return None if stored is None else [n * width for n in stored]

    if table:
        factors = align_rows(factors)
    rule = COMBINATION_TYPES[combination_type]
    options = {"density": density, "majority_sign_method": majority_sign_method, "draw": draw}
    if rule == "cat":
        a = torch.cat([f.lora_A * (w * f.scale) for f, w in zip(factors, weights)], 1 if table else 0)
        b = torch.cat([f.lora_B for f in factors], 0 if table else 1)
    elif combination_type.endswith("svd"):
        delta = combine(
            [delta_of(f) for f in factors], weights, rule, sizes=sizes(factors[0].lora_B.shape[1]), **options
        )
        u, s, vh = truncated_svd(delta, svd_rank or max(rank_of(f) for f in factors))
        a, b = (u, s.unsqueeze(1) * vh) if table else (vh, u * s)
    else:
        alphas = [w * f.scale for f, w in zip(factors, weights)]
        a = combine(
            [f.lora_A for f in factors],
            [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in alphas],
            rule,
            sizes=sizes(factors[0].lora_A.shape[1]),
            **options,
        )
        b = combine([f.lora_B for f in factors], [math.sqrt(abs(x)) for x in alphas], rule, **options)
    return AdapterFactors(a, b, 1.0, factors[0].rows)


# ---------------------------------------------------------------------------------------------
# PeftModel.add_weighted_adapter


def _check_options(combination_type, svd_rank, density, majority_sign_method, seed) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"add_weighted_adapter: combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}"
        )
    rule = COMBINATION_TYPES[combination_type]
    if rule in PRUNING_RULES:
        if density is None:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} needs a density in (0, 1]")
    elif density is not None:
        raise ValueError(f"add_weighted_adapter: density applies to {list(PRUNING_RULES)} (and their _svd forms) only")
    if density is not None:
        real = isinstance(density, (int, float)) and not isinstance(density, bool)
        if not (real and 0 < density <= 1):
            raise ValueError(f"add_weighted_adapter: density must be in (0, 1], got {density!r}")
    if svd_rank is not None:
        if not combination_type.endswith("svd"):
            raise ValueError(
                f"add_weighted_adapter: svd_rank applies to the _svd combination types, not {combination_type!r}"
            )
        check_int("add_weighted_adapter: svd_rank", svd_rank)
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"add_weighted_adapter: majority_sign_method must be one of {list(SIGN_METHODS)}, "
            f"got {majority_sign_method!r}"
        )
    check_int("add_weighted_adapter: seed", seed, minimum=0)


def _check_adapters(model: PeftModel, adapters, weights, adapter_name) -> None:
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names, got {adapters!r}")
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(
                f"add_weighted_adapter: unknown adapter {adapter!r}; adapters: {list(model.adapter_names)}"
            )
        if model.peft_config[adapter].use_dora:
            raise ValueError(f"add_weighted_adapter: adapter {adapter!r} is a DoRA adapter; only plain LoRA combines")
        if model.peft_config[adapter].new_rows:
            raise ValueError(
                f"add_weighted_adapter: adapter {adapter!r} has new-id rows (its ids V + j name its own "
                "segment's new ids, not another adapter's); adapters with new rows do not combine"
            )
    check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter {adapter_name!r} already exists")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: weights must be a list of {len(adapters)} numbers, got {weights!r}")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weight!r}")
    for name, holder in model.adapter_holders().items():
        saved = [a for a in adapters if holder.has_adapter(a)]
        if saved and not isinstance(holder, LoraLayer):
            raise ValueError(
                f"add_weighted_adapter: {name} is saved whole by adapter {saved[0]!r} (modules_to_save); "
                "trained copies of a module do not combine"
            )


def _gather_factors(model: PeftModel, adapters) -> list[tuple[LoraLayer, str, str, list[AdapterFactors]]]:
    """(layer, part, target name, the adapters' factors there) for every target, in model order;
    the adapters must adapt the same targets."""
    targets = []
    for name, layer in model.lora_layers().items():
        held = [a for a in adapters if layer.has_adapter(a)]
        if not held:
            continue
        if len(held) < len(adapters):
            missing = next(a for a in adapters if a not in held)
            raise ValueError(
                f"add_weighted_adapter: {name} is adapted by {held[0]!r} but not by {missing!r}; "
                "the adapters must adapt the same modules"
            )
        per_adapter = {a: layer.adapter_factors(a) for a in adapters}
        parts = per_adapter[adapters[0]]
        for a in adapters:
            if set(per_adapter[a]) != set(parts):
                odd = sorted(set(per_adapter[a]) ^ set(parts))[0]
                raise ValueError(
                    f"add_weighted_adapter: {name}.{odd} is adapted by only some of {list(adapters)}; "
                    "the adapters must adapt the same tables"
                )
        for part in parts:
            target = f"{name}.{part}" if part else name
            targets.append((layer, part, target, [per_adapter[a][part] for a in adapters]))
    return targets


def _new_rank(target: str, factors: list[AdapterFactors], adapters, combination_type: str, svd_rank) -> int:
    ranks = [rank_of(f) for f in factors]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type.endswith("svd"):
        return svd_rank or max(ranks)
    if len(set(ranks)) > 1:
        raise ValueError(
            f"add_weighted_adapter: combination_type {combination_type!r} needs equal ranks, but {target} has "
            f"{dict(zip(adapters, ranks))}; use 'cat' or 'svd'"
        )
    return ranks[0]


@torch.no_grad()
def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> None:
    """Add ``adapter_name`` to ``model``: on every target of ``adapters`` (which must all adapt the
    same ones) the factors :func:`combine_factors` makes from theirs, with scale 1; its config is
    the first adapter's with each target's new rank (α = r), no rsLoRA, DoRA, bias or
    modules_to_save. It is trainable and not activated (``set_adapter``). Every argument is
    checked, and every factor computed, before the model changes."""
    _check_options(combination_type, svd_rank, density, majority_sign_method, seed)
    _check_adapters(model, adapters, weights, adapter_name)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(adapters) == 1:
        combination_type, svd_rank, density = "linear", None, None
    generator = torch.Generator().manual_seed(seed)
    draw = lambda shape: torch.rand(shape, dtype=torch.float64, generator=generator)  # noqa: E731
    targets = _gather_factors(model, adapters)
    ranks, merged = {}, {}
    for layer, part, target, factors in targets:
        ranks[target] = _new_rank(target, factors, adapters, combination_type, svd_rank)
        merged.setdefault(layer, {})[part] = combine_factors(
            factors,
            weights,
            combination_type,
            svd_rank=ranks[target],
            density=density,
            majority_sign_method=majority_sign_method,
            draw=draw,
        )
    top = max(ranks.values())
    config = dataclasses.replace(
        model.peft_config[adapters[0]],
        r=top,
        lora_alpha=top,
        target_modules=list(ranks),
        exclude_modules=None,
        rank_pattern={},
        alpha_pattern={},
        adapted_modules={t: {"r": r, "lora_alpha": r} for t, r in ranks.items()},
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        bias=LoraBias.NONE,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
        inference_mode=False,
        config_file=None,
    )
    model.add_adapter(adapter_name, config)
    try:
        for layer, parts in merged.items():
            layer.set_adapter_factors(adapter_name, parts)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
