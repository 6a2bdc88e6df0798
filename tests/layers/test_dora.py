"""DoRA on nn.Linear against the paper's formula, computed independently in float64:
W' = diag(m / ‖W + s·B·A‖)·(W + s·B·A) with the norm detached, y = x·W'ᵀ + b; exact at init;
merge and unmerge; refusals (routing, merging with other adapters, EmbeddingBag targets).
DoRA on nn.Embedding as HF PEFT defines it (the table as the map Eᵀ of one-hot ids): m [D],
out = g⊙(E[ids] + s·A[ids]·B), g = m / ‖E + s·A·B‖ over the V rows, detached; the same checks,
the padding row, the sparse gradient of A and the file. (Conv DoRA: tests/layers/test_lora_conv.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers import LoraEmbedding
from recpeft.layers.adapter_holder import AdapterStateError
from recpeft.layers.linear import LoraLinear
from recpeft.layers.routing import routed

from reference_math import assert_normwise_close
from toy_models import make_batch, make_model

N, K, R, SCALE = 12, 24, 4, 1.5
# Float32 against float64 through a row norm (K squares, a square root), a division and two
# GEMMs of length ≤ K: each result is within a few K·2^-24 ≈ 1.4e-6 of max|y| (no cancellation in
# the norms; the GEMMs' is bounded normwise by their inputs' norms). 2^-14 ≈ 6e-5 leaves a 40×
# margin; plain LoRA in place of DoRA (m moved 30% off its start) is off by O(10^-1).
REL = 2.0**-14


def _layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(K, N).to(dtype), "fc")
    layer.update_layer("default", r=R, scale=SCALE, dropout=0.0, init=True)
    layer.enable_dora("default")
    layer.active_adapters = ["default"]
    return layer


def _train_like(layer, seed=1):
    """Move A, B and m away from their start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.3, generator=g)
        magnitude = layer.lora_magnitude_vector["default"]
        magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=g, dtype=magnitude.dtype))


def _paper(x, W, b, A, B, m, scale):
    """The paper's DoRA output in float64: x·(diag(m/‖V‖)·V)ᵀ + b, V = W + s·B·A, ‖V‖ detached."""
    V = W + scale * B @ A
    return x @ ((m / V.norm(dim=1).detach()).unsqueeze(1) * V).t() + b


def test_a_fresh_dora_adapter_leaves_the_layer_exactly_as_it_was():
    layer = _layer()
    x = torch.randn(7, K)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_and_gradients_match_the_paper_in_float64():
    layer = _layer()
    _train_like(layer)
    x = torch.randn(9, K, requires_grad=True)
    dy = torch.randn(9, N)
    (layer(x) * dy).sum().backward()
    leaves = {
        "x": x,
        "A": layer.lora_A["default"],
        "B": layer.lora_B["default"],
        "m": layer.lora_magnitude_vector["default"],
    }
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    y64 = _paper(ref["x"], W, b, ref["A"], ref["B"], ref["m"], SCALE)
    (y64 * dy.double()).sum().backward()
    assert_normwise_close(layer(x).detach().double(), y64.detach(), rel=REL, name="y")
    for name, leaf in leaves.items():
        assert_normwise_close(leaf.grad.double(), ref[name].grad, rel=REL, name=f"d{name}")
    with torch.no_grad():  # plain LoRA (g = 1) is not what was computed
        lora = _paper(ref["x"], W, b, ref["A"], ref["B"], (W + SCALE * ref["B"] @ ref["A"]).norm(dim=1), SCALE)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_normwise_close(y64.detach(), lora, rel=REL)


def test_merge_writes_the_decomposed_weight_and_unmerge_restores_it():
    """In float64: a handful of roundings of 2^-53 each, far inside 2^-40 (which a merge that
    forgot g, or unmerged without dividing by it, misses by O(10^-1))."""
    layer = _layer(dtype=torch.float64)
    _train_like(layer)
    x = torch.randn(5, K, dtype=torch.float64)
    before, out = layer.base_layer.weight.clone(), layer(x).detach()
    layer.merge(["default"])
    assert_normwise_close(layer.base_layer(x), out, rel=2.0**-40, name="merged")
    layer.unmerge()
    assert_normwise_close(layer.base_layer.weight, before, rel=2.0**-40, name="W")
    assert_normwise_close(layer(x).detach(), out, rel=2.0**-40, name="unmerged again")
    assert not layer.merged_adapters and not layer._merged_dora_scale


def test_a_dora_adapter_merges_alone_and_is_not_routed():
    layer = _layer()
    layer.update_layer("plain", r=2, scale=1.0, dropout=0.0, init=False)
    with pytest.raises(ValueError, match="merges alone"):
        layer.merge(["default", "plain"])
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"], use_dora=True), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["mlp.0"]))
    with pytest.raises(ValueError, match="routing does not support DoRA"):
        model(*make_batch(batch=4), adapter_ids=torch.tensor([0, 1, -1, 0]))


def test_dora_on_an_embedding_bag_is_refused_naming_the_module():
    """HF PEFT has no EmbeddingBag layer, hence no DoRA for one to follow."""
    model = make_model()
    expected = (
        "^use_dora: history is an EmbeddingBag; recpeft has DoRA for nn.Linear, nn.Conv1d, nn.Conv2d "
        "and nn.Embedding targets only$"
    )
    with pytest.raises(ValueError, match=expected):
        get_peft_model(model, LoraConfig(r=2, target_modules=["mlp.0", "item", "history"], use_dora=True))
    assert not any("lora" in n for n, _ in model.named_parameters())  # the model is left as it was


def test_save_and_load_keep_the_magnitude_bit_for_bit(tmp_path):
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0", "mlp.2"], use_dora=True))
    for holder in model.adapter_holders().values():
        _train_like(holder)
    batch = make_batch()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert loaded.peft_config["default"].use_dora
    assert torch.equal(loaded(*batch), model(*batch))
    assert "base_model.model.mlp.0.lora_magnitude_vector" in model.adapter_state_dict()


# ---- nn.Embedding ----------------------------------------------------------------------------

V, D = 40, 6
PAD = 3


def _embedding(padding_idx=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = LoraEmbedding(nn.Embedding(V, D, padding_idx=padding_idx).to(dtype).requires_grad_(False), "emb")
    layer.update_layer("default", r=R, scale=SCALE, dropout=0.0, init=True)
    layer.enable_dora("default")
    layer.active_adapters = ["default"]
    return layer


def _train_embedding_like(layer, adapter="default", seed=1):
    """Touch a third of A's rows (the padding row among them, which must make no difference) and
    move m 30% off its start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a = layer.lora_A[adapter]
        rows = torch.cat([torch.tensor([PAD]), torch.randperm(V, generator=g)[: V // 3]])
        a[rows] = torch.randn(rows.numel(), a.shape[1], generator=g, dtype=a.dtype)
        if layer.is_dora(adapter):
            m = layer.lora_magnitude_vector[adapter]
            m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g, dtype=m.dtype))


def _ids(padding_idx, seed=2):
    ids = torch.randint(0, V, (5, 4), generator=torch.Generator().manual_seed(seed))
    if padding_idx is not None:
        ids[0, 1] = ids[3, 0] = padding_idx
    return ids


def _paper_embedding(ids, E, A, B, m, scale, padding_idx):
    """HF PEFT's DoRA embedding in float64: Â = A with the padding row zero, V = E + s·Â·B,
    g = m / ‖V‖ over the rows (detached), out = g⊙(E[ids] + s·Â[ids]·B)."""
    keep = torch.ones(E.shape[0], 1, dtype=E.dtype)
    if padding_idx is not None:
        keep[padding_idx] = 0
    A_hat = A * keep
    g = m / (E + scale * A_hat @ B).norm(dim=0).detach()
    return g * (E[ids] + scale * A_hat[ids] @ B)


@pytest.mark.parametrize("padding_idx", [None, PAD])
def test_a_fresh_dora_embedding_adapter_leaves_the_table_exactly_as_it_was(padding_idx):
    layer = _embedding(padding_idx)
    assert layer.lora_magnitude_vector["default"].shape == (D,)  # HF PEFT's shape
    ids = _ids(padding_idx)
    assert torch.equal(layer(ids), layer.base_layer(ids))


@pytest.mark.parametrize("padding_idx", [None, PAD])
def test_dora_embedding_forward_and_gradients_match_hf_peft_math_in_float64(padding_idx):
    """Float32 against float64 through a column norm over V = 40 squares, a division and
    products of length r: each result within a few V·2^-24 ≈ 2.4e-6 of its scale; 2^-14 (REL)
    leaves a wide margin, and plain LoRA in place of DoRA is off by O(10^-1)."""
    layer = _embedding(padding_idx)
    _train_embedding_like(layer)
    ids = _ids(padding_idx)
    out = layer(ids)
    dy = torch.randn(out.shape)
    (out * dy).sum().backward()
    leaves = {"A": layer.lora_A["default"], "B": layer.lora_B["default"], "m": layer.lora_magnitude_vector["default"]}
    assert leaves["A"].grad.is_sparse  # only the looked-up rows: LoraAdamW's sparse step
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    E = layer.base_weight.detach().double()
    expected = _paper_embedding(ids, E, ref["A"], ref["B"], ref["m"], SCALE, padding_idx)
    (expected * dy.double()).sum().backward()
    assert_normwise_close(out, expected, rel=REL, name="out")
    for name, leaf in leaves.items():
        assert_normwise_close(leaf.grad.to_dense(), ref[name].grad, rel=REL, name=f"d{name}")
    plain_lora = E[ids] + SCALE * ref["A"].detach()[ids] @ ref["B"].detach()  # g = 1: not what was computed
    with pytest.raises(AssertionError, match="exceeds"):
        assert_normwise_close(expected.detach(), plain_lora, rel=REL)


def test_dora_and_plain_embedding_adapters_add_up():
    """out = E[ids] + s·A_p[ids]·B_p + (g − 1)⊙E[ids] + g⊙(s·A[ids]·B), float64 to 2^-40."""
    layer = _embedding(PAD, dtype=torch.float64)
    layer.update_layer("plain", r=2, scale=0.5, dropout=0.0, init=False)
    _train_embedding_like(layer)
    layer.active_adapters = ["default", "plain"]
    ids = _ids(PAD)
    E, A, B, m = (
        t.detach()
        for t in (
            layer.base_weight,
            layer.lora_A["default"],
            layer.lora_B["default"],
            layer.lora_magnitude_vector["default"],
        )
    )
    A_p, B_p = layer.lora_A["plain"].detach().clone(), layer.lora_B["plain"].detach()
    A_p[PAD] = 0
    expected = _paper_embedding(ids, E, A, B, m, SCALE, PAD) + 0.5 * A_p[ids] @ B_p
    assert_normwise_close(layer(ids), expected, rel=2.0**-40, name="out")


def test_dora_embedding_merge_rescales_the_table_and_unmerge_restores_it():
    """Float64: a handful of roundings of 2^-53, far inside 2^-40 (a merge that forgot g, or
    the padding row, misses by O(10^-1))."""
    layer = _embedding(PAD, dtype=torch.float64)
    _train_embedding_like(layer)
    ids = _ids(PAD)
    before, out = layer.base_weight.clone(), layer(ids).detach()
    layer.merge(["default"])
    assert_normwise_close(layer.base_layer(ids), out, rel=2.0**-40, name="merged")
    layer.unmerge()
    assert_normwise_close(layer.base_weight, before, rel=2.0**-40, name="E")
    assert_normwise_close(layer(ids).detach(), out, rel=2.0**-40, name="unmerged again")
    assert not layer.merged_adapters and not layer._merged_dora_scale


def test_a_dora_embedding_adapter_is_not_routed_nor_combined():
    layer = _embedding()
    layer.update_layer("plain", r=2, scale=1.0, dropout=0.0, init=False)
    with (
        routed(torch.tensor([0, 1, -1, 0, 1]), ("default", "plain")),
        pytest.raises(ValueError, match="does not support DoRA"),
    ):
        layer(_ids(None))
    with pytest.raises(ValueError, match="^emb: adapter 'default' is a DoRA adapter; its update is not s·B·A$"):
        layer.adapter_factors("default")


def test_dora_embedding_files_keep_sparse_rows_and_the_magnitude_bit_for_bit(tmp_path):
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["item", "mlp.0"], use_dora=True))
    _train_embedding_like(model.lora_layers()["item"])
    _train_like(model.lora_layers()["mlp.0"])
    batch = make_batch()
    model.save_pretrained(tmp_path)
    state = model.adapter_state_dict()
    assert state["base_model.model.item.lora_magnitude_vector"].shape == (8,)
    assert "base_model.model.item.lora_embedding_A.indices" in state  # touched rows only, as without DoRA
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(loaded(*batch), model(*batch))
    del state["base_model.model.item.lora_magnitude_vector"]
    fresh = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["item", "mlp.0"], use_dora=True))
    with pytest.raises(AdapterStateError, match="^f: missing key item.lora_magnitude_vector$"):
        fresh.load_adapter_state("default", state, source="f")
