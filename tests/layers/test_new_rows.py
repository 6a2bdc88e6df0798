"""New-id rows: an adapter's rows of its own for ids past the frozen table's V (recpeft.layers.new_rows).

Each looked-up row must be E[i] + s·A[i]·B for i < V and E[k] + s·A[i]·B for V ≤ i < V + n (k the
new-id row), pooled as the bag pools; checked against that formula in float64, forward and
gradient, unrouted and routed, and through save/load and merging (which extends the table)."""

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model

from reference_math import assert_within_bound, gamma

V, D, R, NEW = 12, 6, 3, 5
SCALE = 2.0  # lora_alpha 6 / r 3


class Shop(nn.Module):
    """customer [B] → Embedding row; basket [B, L] → mean-pooled bag; both over V rows."""

    def __init__(self):
        super().__init__()
        self.customers = nn.Embedding(V, D)
        self.basket = nn.EmbeddingBag(V, D, mode="mean")
        self.head = nn.Linear(2 * D, 1)

    def forward(self, customer, basket):
        return self.head(torch.cat([self.customers(customer), self.basket(basket)], dim=1)).squeeze(1)


def _model(seed=0, new=NEW, new_id_row=0, name="default", base=None):
    torch.manual_seed(seed)
    base = base or Shop()
    config = LoraConfig(
        r=R,
        lora_alpha=R * SCALE,
        target_modules=["customers", "basket"],
        new_rows={"customers": new, "basket": new},
        new_id_row=new_id_row,
    )
    model = get_peft_model(base, config, adapter_name=name)
    _randomise(model, name, seed)
    return model


def _randomise(model, adapter, seed):
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for layer in model.lora_layers().values():
            if adapter in layer.lora_A:
                a = layer.lora_A[adapter]
                a.copy_(torch.randn(a.shape, generator=g))
                layer.lora_B[adapter].copy_(torch.randn(layer.lora_B[adapter].shape, generator=g))


def _rows64(layer, adapter, ids):
    """float64 E[i] + s·A[i]·B (i < V), E[k] + s·A[i]·B (i ≥ V) for a flat list of ids."""
    e = layer.base_layer.weight.detach().double()
    a, b = layer.lora_A[adapter].detach().double(), layer.lora_B[adapter].detach().double()
    k = layer.new_rows[adapter].new_id_row
    base = e[torch.where(ids >= V, torch.full_like(ids, k), ids)]
    return base + layer.scaling[adapter] * a[ids] @ b


def _inputs(seed=1, batch=8, length=4, high=V + NEW):
    g = torch.Generator().manual_seed(seed)
    customer = torch.randint(0, high, (batch,), generator=g)
    basket = torch.randint(0, high, (batch, length), generator=g)
    customer[:2] = torch.tensor([V, V + NEW - 1]) if high > V else customer[:2]  # first and last new id
    return customer, basket


def test_config_checks_new_rows():
    with pytest.raises(ValueError, match=r"new_rows\['t'\]"):
        LoraConfig(target_modules=["t"], new_rows={"t": 0})
    with pytest.raises(ValueError, match="new_id_row"):
        LoraConfig(target_modules=["t"], new_rows={"t": 2}, new_id_row="last")


def test_new_ids_look_up_the_new_id_row_plus_their_own_offset():
    model = _model()
    customer, basket = _inputs()
    layers = model.lora_layers()
    cust, bag = layers["customers"], layers["basket"]
    got_rows = cust(customer)
    expected = _rows64(cust, "default", customer)
    bound = _rows64_abs(cust, "default", customer)
    assert_within_bound(got_rows, expected, bound, R + 2, computed=1, name="customers")
    got_bags = bag(basket)
    pooled = torch.stack([_rows64(bag, "default", row).mean(0) for row in basket])
    pooled_bound = torch.stack([_rows64_abs(bag, "default", row).mean(0) for row in basket])
    assert_within_bound(got_bags, pooled, pooled_bound, R + 2 + basket.shape[1] + 1, computed=1, name="basket")
    # the new id rows differ from the new-id row itself: the offset is there
    assert not torch.allclose(got_rows[0], cust.base_layer.weight[0])


def _rows64_abs(layer, adapter, ids):
    e = layer.base_layer.weight.detach().double().abs()
    a, b = layer.lora_A[adapter].detach().double().abs(), layer.lora_B[adapter].detach().double().abs()
    k = layer.new_rows[adapter].new_id_row
    return e[torch.where(ids >= V, torch.full_like(ids, k), ids)] + layer.scaling[adapter] * a[ids] @ b


def test_a_fresh_adapter_serves_a_new_id_as_the_new_id_row():
    torch.manual_seed(0)
    base = Shop()
    config = LoraConfig(r=R, target_modules=["customers", "basket"], new_rows={"customers": NEW}, new_id_row=0)
    model = get_peft_model(base, config)
    layer = model.lora_layers()["customers"]
    assert tuple(layer.lora_A["default"].shape) == (V + NEW, R)
    out = layer(torch.tensor([V, V + 3, 0, 5]))
    weight = layer.base_layer.weight
    assert torch.equal(out, torch.stack([weight[0], weight[0], weight[0], weight[5]]))


def test_ids_past_the_rows_are_refused_naming_the_table():
    model = _model()
    with pytest.raises(IndexError, match=rf"customers: id {V + NEW} .* out of range \[0, {V + NEW}\)"):
        model(torch.tensor([V + NEW]), torch.zeros(1, 2, dtype=torch.long))
    with model.disable_adapter():  # the base alone has V rows
        with pytest.raises(IndexError, match=rf"customers: id {V} .* out of range \[0, {V}\)"):
            model(torch.tensor([V]), torch.zeros(1, 2, dtype=torch.long))


def test_gradients_reach_the_new_rows_looked_up_and_no_other():
    model = _model()
    customer, basket = _inputs()
    model(customer, basket).square().sum().backward()
    layer = model.lora_layers()["customers"]
    grad = layer.lora_A["default"].grad.to_dense()
    touched = set(customer.tolist())
    for row in range(V + NEW):
        assert bool(grad[row].any()) == (row in touched), row


def test_gradient_of_a_new_row_matches_the_formula():
    model = _model()
    layer = model.lora_layers()["customers"]
    ids = torch.tensor([V + 1, V + 1, 3, V + 4])
    weights = torch.randn(len(ids), D, generator=torch.Generator().manual_seed(5))
    (layer(ids) * weights).sum().backward()
    # d/dA[i] of Σ_t w_t·(s·A[ids_t]·B) = s·Σ_{t: ids_t = i} w_t·Bᵀ
    b = layer.lora_B["default"].detach().double()
    expected = torch.zeros(V + NEW, R, dtype=torch.float64)
    expected.index_add_(0, ids, layer.scaling["default"] * weights.double() @ b.t())
    terms = layer.scaling["default"] * weights.double().abs() @ b.abs().t()
    bound = torch.zeros_like(expected).index_add_(0, ids, terms)
    assert_within_bound(layer.lora_A["default"].grad.to_dense(), expected, bound, D + 3, computed=1, name="dA")


def test_save_and_load_keep_the_new_rows(tmp_path):
    model = _model()
    customer, basket = _inputs()
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(0), tmp_path / "adapter")
    assert loaded.peft_config["default"].new_rows == {"customers": NEW, "basket": NEW}
    with torch.no_grad():
        assert torch.equal(loaded(customer, basket), model(customer, basket))


def _base(seed):
    torch.manual_seed(seed)
    return Shop()


def test_merging_extends_the_table_and_unmerging_restores_it():
    model = _model()
    customer, basket = _inputs()
    with torch.no_grad():
        unmerged = model(customer, basket)
        before = model.lora_layers()["customers"].base_layer.weight.clone()
        model.merge_adapter()
        layer = model.lora_layers()["customers"]
        assert tuple(layer.base_layer.weight.shape) == (V + NEW, D)
        merged = model(customer, basket)
        model.unmerge_adapter()
        assert tuple(layer.base_layer.weight.shape) == (V, D)
        assert_within_bound(layer.base_layer.weight, before, before.abs() + 1.0, 2 * (R + 2), name="restored")
    bound = unmerged.abs() + 1.0  # every term below is O(1): roundings of W + s·A·B, then the head
    assert_within_bound(merged, unmerged, bound * 100, 2 * D + R + 8, name="merged")
    plain = model.merge_and_unload()
    assert plain.customers.num_embeddings == V + NEW and plain.basket.weight.shape == (V + NEW, D)
    with torch.no_grad():
        assert_within_bound(plain(customer, basket), unmerged, bound * 100, 2 * D + R + 8, name="merge_and_unload")


def test_routed_samples_use_their_own_adapters_new_rows():
    model = _model(new=NEW, name="de")
    model.add_adapter(
        "fr",
        LoraConfig(r=2, lora_alpha=2, target_modules=["customers", "basket"], new_rows={"customers": 2}, new_id_row=0),
    )
    _randomise(model, "fr", seed=7)
    customer = torch.tensor([V + 4, V + 1, 2, 3, V + 1])
    basket = torch.randint(0, V, (5, 3), generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 1, -1, 1, 0])  # de, fr, base, fr, de
    with torch.no_grad():
        routed = model(customer, basket, adapter_ids=ids)
        for name, index in (("de", 0), ("fr", 1)):
            model.set_adapter(name)
            alone = model(customer[ids == index], basket[ids == index])
            slack = 64 * gamma(2 * D + 8) * (1 + alone.abs().max())
            assert torch.allclose(routed[ids == index], alone, rtol=0, atol=slack)
        with model.disable_adapter():
            base = model(customer[ids == -1], basket[ids == -1])
        assert torch.allclose(routed[ids == -1], base, rtol=0, atol=64 * gamma(2 * D + 8) * (1 + base.abs().max()))
    # fr has 2 new rows: id V + 2 is past them, de's 5 rows do not lend it one
    with pytest.raises(IndexError, match=rf"customers: id {V + 2} .* past the {V + 2} rows of adapter 'fr'"):
        model(torch.tensor([V + 2, V + 2]), basket[:2], adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="the base"):
        model(torch.tensor([V]), basket[:1], adapter_ids=torch.tensor([-1]))


def test_what_takes_no_new_rows_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"new_rows: head is an Linear"):
        get_peft_model(_base(0), LoraConfig(target_modules=["head"], new_rows={"head": 2}))
    with pytest.raises(ValueError, match=r"new_rows names \['basket'\]"):
        get_peft_model(_base(0), LoraConfig(target_modules=["customers"], new_rows={"basket": 2}))
    with pytest.raises(ValueError, match="DoRA adapter takes no new rows"):
        get_peft_model(_base(0), LoraConfig(target_modules=["customers"], use_dora=True, new_rows={"customers": 2}))
    with pytest.raises(ValueError, match="new_id_row 12 is not a row"):
        get_peft_model(_base(0), LoraConfig(target_modules=["customers"], new_rows={"customers": 2}, new_id_row=V))
    model = _model(name="de")
    model.add_adapter("fr", LoraConfig(target_modules=["customers"], new_rows={"customers": 2}, new_id_row=0))
    model.base_model.customers.set_active_adapters(["de", "fr"])
    with pytest.raises(ValueError, match="two active adapters have new-id rows"):
        model.base_model.customers(torch.tensor([V]))
    with pytest.raises(ValueError, match="all have new-id rows"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="adapter 'de' has new-id rows .* do not combine"):
        model.add_weighted_adapter(["de", "fr"], [0.5, 0.5], "mix")
    assert "mix" not in model.peft_config
