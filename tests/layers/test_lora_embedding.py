"""LoRA Embedding and EmbeddingBag: every input form against the float64 per-bag formula,
gradients of A (sparse, used rows only) and B, zero-init identity, bad ids."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from recpeft.layers import LoraEmbedding, LoraEmbeddingBag

from reference_math import abs_inputs, abs_twin, assert_within_bound, leaf64, naive_bag


def _twin_grads(layer, args, dy):
    """The absolute-value twin's output and A, B gradients for the loss Σ out·|dy| (the bound of
    reference_math.assert_within_bound)."""
    twin = abs_twin(layer)
    out = twin(*abs_inputs(*args))
    if out.numel():
        (out * dy.abs()).sum().backward()
    grads = [dense_grad(twin.lora_A["default"].grad), twin.lora_B["default"].grad]
    return out.detach(), [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads, (twin.lora_A["default"], twin.lora_B["default"]))
    ]


def dense_grad(t):
    return None if t is None else (t.to_dense() if t.is_sparse else t)


def _roundings(ids, bags):
    """A bag of ≤ ids ids (·w, Σ, /n), its pooled A·B (R), ·s, + the pooled table; the gradients
    sum over the bags and the D outputs."""
    return 2 * ids + R + 6 + bags + D


V, D, R = 23, 6, 3


def _wrap(base, cls, init=False, scale=1.5):
    layer = cls(base.double().requires_grad_(False), "tables.t0")
    layer.update_layer("default", r=R, scale=scale, dropout=0.0, init=init)
    layer.active_adapters = ["default"]
    return layer


bag_cases = st.fixed_dictionaries(
    {
        "lengths": st.lists(st.integers(0, 5), min_size=0, max_size=7),
        "form": st.sampled_from(["offsets", "include_last_offset", "2d"]),
        "mode": st.sampled_from(["sum", "mean"]),
        "weighted": st.booleans(),
        "padding_idx": st.sampled_from([None, 0, 4]),
        "id_dtype": st.sampled_from([torch.int64, torch.int32]),
        "seed": st.integers(0, 2**16),
    }
)


def _inputs(case, g):
    lengths = case["lengths"]
    if case["form"] == "2d":
        width = lengths[0] if lengths else 0
        lengths = [width] * len(lengths)
    bags = [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
    flat = torch.tensor([i for bag in bags for i in bag], dtype=case["id_dtype"])
    weighted = case["weighted"] and case["mode"] == "sum"
    weights = [torch.rand(n, generator=g, dtype=torch.float64).tolist() for n in lengths] if weighted else None
    psw = torch.tensor([w for ws in weights for w in ws], dtype=torch.float64) if weighted else None
    starts = (
        torch.tensor([0] + lengths[:-1], dtype=case["id_dtype"]).cumsum(0)
        if lengths
        else torch.zeros(0, dtype=case["id_dtype"])
    )
    if case["form"] == "2d":
        shape = (len(lengths), lengths[0])
        args = (flat.view(shape), None, psw.view(shape) if weighted else None)
    elif case["form"] == "include_last_offset":
        args = (flat, torch.cat([starts, starts.new_tensor([flat.numel()])]), psw)
    else:
        args = (flat, starts, psw)
    return bags, weights, args


@given(bag_cases)
def test_embedding_bag_every_input_form_matches_float64(case):
    if case["form"] == "2d" and not (case["lengths"] and case["lengths"][0]):
        case["lengths"] = [2] + case["lengths"][1:]  # torch's own bag refuses [B, 0] input
    g = torch.Generator().manual_seed(case["seed"])
    base = nn.EmbeddingBag(
        V,
        D,
        mode=case["mode"],
        padding_idx=case["padding_idx"],
        include_last_offset=case["form"] == "include_last_offset",
    )
    layer = _wrap(base, LoraEmbeddingBag)
    bags, weights, args = _inputs(case, g)
    dy = torch.randn(len(bags), D, generator=g, dtype=torch.float64)

    out = layer(*args)
    out.backward(dy)

    E = base.weight.detach().double()
    A, B = leaf64(layer.lora_A["default"]), leaf64(layer.lora_B["default"])
    expected = naive_bag(bags, E, A, B, 1.5, case["mode"], weights, case["padding_idx"])
    bound, (bound_a, bound_b) = _twin_grads(layer, args, dy)
    count = _roundings(sum(map(len, bags)), len(bags))
    assert_within_bound(out, expected, bound, count, torch.float64, name="out")
    if not expected.requires_grad:  # no bags at all: nothing to differentiate
        return
    expected.backward(dy)
    grad_a = layer.lora_A["default"].grad
    assert grad_a is not None and grad_a.is_sparse
    expected_a = A.grad if A.grad is not None else torch.zeros_like(A)  # None: no id contributed
    assert_within_bound(grad_a, expected_a, bound_a, count, torch.float64, name="dA")
    used = {i for bag in bags for i in bag if i != case["padding_idx"]}
    assert set(grad_a.coalesce().indices()[0].tolist()) <= used  # no row outside the batch
    expected_b = B.grad if B.grad is not None else torch.zeros_like(B)
    assert_within_bound(layer.lora_B["default"].grad, expected_b, bound_b, count, torch.float64, name="dB")
    assert base.weight.grad is None


@given(st.sampled_from([(5,), (3, 4), (0,), (2, 0)]), st.sampled_from([None, 2]), st.integers(0, 2**16))
def test_embedding_matches_float64(shape, padding_idx, seed):
    g = torch.Generator().manual_seed(seed)
    base = nn.Embedding(V, D, padding_idx=padding_idx)
    layer = _wrap(base, LoraEmbedding)
    ids = torch.randint(0, V, shape, generator=g)
    if padding_idx is not None and ids.numel():
        ids.view(-1)[0] = padding_idx
    dy = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    out = layer(ids)
    out.backward(dy)

    A, B = leaf64(layer.lora_A["default"]), leaf64(layer.lora_B["default"])
    E = base.weight.detach().double()
    flat = ids.reshape(-1).tolist()
    expected = naive_bag([[i] for i in flat], E, A, B, 1.5, padding_idx=padding_idx)
    # a padding id keeps its base row (nn.Embedding returns E[padding_idx]) and gets no delta
    for pos, i in enumerate(flat):
        if i == padding_idx:
            expected = expected.index_copy(0, torch.tensor([pos]), E[i].unsqueeze(0))
    expected = expected.view(*shape, D)
    assert out.shape == (*shape, D)
    bound, (bound_a, bound_b) = _twin_grads(layer, (ids,), dy)
    count = _roundings(1, ids.numel())
    assert_within_bound(out, expected, bound, count, torch.float64, name="out")
    if ids.numel():
        expected.backward(dy)
        assert_within_bound(layer.lora_A["default"].grad, A.grad, bound_a, count, torch.float64, name="dA")
        assert_within_bound(layer.lora_B["default"].grad, B.grad, bound_b, count, torch.float64, name="dB")


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_zero_init_equals_base_bit_for_bit(mode):
    base = nn.EmbeddingBag(1000, 16, mode=mode, padding_idx=3)
    layer = LoraEmbeddingBag(base, "bag")
    layer.update_layer("default", r=4, scale=2.0, dropout=0.0, init=True)
    layer.active_adapters = ["default"]
    ids, offsets = torch.randint(0, 1000, (300,)), torch.tensor([0, 0, 17, 120, 299])
    assert torch.equal(layer(ids, offsets), base(ids, offsets))
    emb = LoraEmbedding(nn.Embedding(1000, 16), "emb")
    emb.update_layer("default", r=4, scale=2.0, dropout=0.0, init=True)
    emb.active_adapters = ["default"]
    ids2 = torch.randint(0, 1000, (8, 9))
    assert torch.equal(emb(ids2), emb.base_layer(ids2))


@pytest.mark.parametrize("bad,message", [(23, "id 23 at position 2 is out of range"), (-1, "id -1 at position 2")])
def test_out_of_range_ids_are_named(bad, message):
    layer = _wrap(nn.EmbeddingBag(V, D), LoraEmbeddingBag)
    with pytest.raises(IndexError, match=f"tables.t0: {message}"):
        layer(torch.tensor([1, 2, bad]), torch.tensor([0]))
    emb = _wrap(nn.Embedding(V, D), LoraEmbedding)
    with pytest.raises(IndexError, match=f"tables.t0: {message}"):
        emb(torch.tensor([1, 2, bad]))


def test_float_ids_are_refused_with_a_clear_error():
    layer = _wrap(nn.EmbeddingBag(V, D), LoraEmbeddingBag)
    with pytest.raises(TypeError, match="ids must be an int32 or int64 tensor, got torch.float32"):
        layer(torch.tensor([1.0, 2.0]), torch.tensor([0]))


def test_bad_offsets_are_refused():
    layer = _wrap(nn.EmbeddingBag(V, D), LoraEmbeddingBag)
    with pytest.raises(ValueError, match="non-decreasing"):
        layer(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))


def test_max_pooling_is_refused_at_wrap_time():
    with pytest.raises(ValueError, match="mode='max'"):
        LoraEmbeddingBag.check_supported(nn.EmbeddingBag(V, D, mode="max"), "bag")


def test_merge_touches_only_rows_of_a_that_are_nonzero():
    layer = _wrap(nn.EmbeddingBag(V, D), LoraEmbeddingBag, init=True)
    with torch.no_grad():
        layer.lora_A["default"][[2, 7]] = torch.randn(2, R, dtype=torch.float64)
    ids, offsets = torch.randint(0, V, (40,)), torch.tensor([0, 10, 25])
    before, out = layer.base_layer.weight.clone(), layer(ids, offsets)
    twin = abs_twin(layer)
    bound = twin(ids, offsets).detach()
    layer.merge(["default"])
    changed = (layer.base_layer.weight != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [2, 7]
    # a float64 table merges in float64 (a float32 product would miss this bound by 10^5)
    assert_within_bound(layer.base_layer(ids, offsets), out, bound, _roundings(15, 3), torch.float64, name="merged")
    twin.merge(["default"])  # |E| + s·|A|·|B|
    layer.unmerge()
    # (E + s·A·B) − s·A·B: R + 2 roundings each way, against the exact E
    bound_e = twin.base_layer.weight
    assert_within_bound(layer.base_layer.weight, before, bound_e, 2 * (R + 2), torch.float64, computed=1, name="E")


def test_merge_leaves_the_padding_row_alone():
    base = nn.Embedding(V, D, padding_idx=2)
    layer = _wrap(base, LoraEmbedding, init=False)  # A random: its padding row is not zero
    ids = torch.tensor([[2, 5, 2], [7, 2, 1]])
    out, bound = layer(ids), abs_twin(layer)(ids).detach()
    layer.merge(["default"])
    assert_within_bound(layer.base_layer(ids), out, bound, _roundings(1, 6), torch.float64, name="merged")
