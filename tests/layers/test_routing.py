"""Per-sample routing: a mixed batch equals every sample run through its own merged model, for
every layer type, in inference and training."""

import copy

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, get_peft_model
from recpeft.layers.routing import grouped_batch

from reference_math import TINY_FORWARD_ROUNDINGS, abs_inputs, abs_twin, assert_bound_can_fail, assert_within_bound
from toy_models import ALL_TARGETS, make_batch, make_model, train_steps

ADAPTERS = {
    "de": LoraConfig(r=4, target_modules=ALL_TARGETS[:4], init_lora_weights=False),
    "fr": LoraConfig(r=2, lora_alpha=6, target_modules=["item", "mlp.0"], init_lora_weights=False),
    "es": LoraConfig(r=3, target_modules=["history", "dense"], modules_to_save=["mlp.2"], init_lora_weights=False),
}


FORWARD_ROUNDINGS = TINY_FORWARD_ROUNDINGS  # derived in reference_math
# Gradients of Σ y²: 2·y (the forward) times ∂y/∂θ (the transposed chain, dot lengths 1, 16, 24
# ≤ the forward's), summed over the 24 rows of the batch (+ r).
BACKWARD_ROUNDINGS = 2 * FORWARD_ROUNDINGS + 1 + 24 + 4


def _bound(model, batch, ids=None, backward=False):
    """The absolute-value twin's output (or its parameters' gradients of Σ y²)."""
    twin = abs_twin(model)
    kwargs = {} if ids is None else {"adapter_ids": ids}
    out = twin(*abs_inputs(*batch), **kwargs)
    if not backward:
        return out.detach()
    out.pow(2).sum().backward()
    return {name: p.grad for name, p in twin.named_parameters()}


def _multi_adapter_model():
    names = list(ADAPTERS)
    model = get_peft_model(make_model(), ADAPTERS[names[0]], names[0])
    for name in names[1:]:
        model.add_adapter(name, ADAPTERS[name])
    return model


def _merged_outputs(model, batch):
    """Each adapter merged into its own copy of the model: {adapter index: output}; −1: base."""
    outputs = {-1: make_model()(*batch)}
    for index, name in enumerate(model.adapter_names):
        single = copy.deepcopy(model)
        single.set_adapter(name)
        outputs[index] = single.merge_and_unload()(*batch)
    return outputs


# random order; ids sorted by the caller (the layers then update contiguous slices in place);
# random order sorted once by the model (group_by_adapter=True), outputs back in the caller's order
ORDERS = ["random order", "grouped by adapter", "group_by_adapter=True"]


def _order(ids, order):
    """(ids, forward kwargs) for one of ORDERS."""
    if order == "grouped by adapter":
        return ids.sort().values, {}
    return ids, {"group_by_adapter": True} if order == "group_by_adapter=True" else {}


@pytest.mark.parametrize("order", ORDERS)
def test_mixed_batch_equals_each_sample_through_its_own_merged_model(order):
    model = _multi_adapter_model()
    batch = make_batch(batch=40, seed=5)
    ids, kwargs = _order(torch.randint(-1, 3, (40,), generator=torch.Generator().manual_seed(3)), order)
    routed = model(*batch, adapter_ids=ids, **kwargs)
    merged = _merged_outputs(model, batch)
    expected = torch.stack([merged[int(a)][i] for i, a in enumerate(ids)])
    bound = _bound(model, batch, ids)
    assert_within_bound(routed, expected, bound, FORWARD_ROUNDINGS, name="routed")
    assert_bound_can_fail(expected, bound, FORWARD_ROUNDINGS)
    wrong = torch.stack([merged[(int(a) + 2) % 4 - 1][i] for i, a in enumerate(ids)])  # each row's neighbour adapter
    with pytest.raises(AssertionError, match="out of bound"):
        assert_within_bound(routed, wrong, bound, FORWARD_ROUNDINGS)


def test_routing_every_sample_to_one_adapter_equals_that_adapter():
    model = _multi_adapter_model()
    batch = make_batch(batch=12)
    model.set_adapter("fr")
    ids = torch.full((12,), 1)
    routed, bound = model(*batch, adapter_ids=ids), _bound(model, batch, ids)
    assert_within_bound(routed, model(*batch), bound, FORWARD_ROUNDINGS, name="routed")
    with pytest.raises(AssertionError, match="out of bound"):
        assert_within_bound(model(*batch, adapter_ids=torch.full((12,), 0)), model(*batch), bound, FORWARD_ROUNDINGS)


@pytest.mark.parametrize("order", ORDERS)
def test_routed_training_gradients_equal_separate_per_adapter_runs(order):
    batch = make_batch(batch=24, seed=8)
    ids, kwargs = _order(torch.tensor([0, 1, 2, -1] * 6), order)
    mixed = _multi_adapter_model()
    mixed(*batch, adapter_ids=ids, **kwargs).pow(2).sum().backward()

    separate = _multi_adapter_model()
    for index, name in enumerate(separate.adapter_names):
        rows = (ids == index).nonzero().squeeze(1)
        separate.set_adapter(name)
        separate(*(t[rows] for t in batch)).pow(2).sum().backward()

    grads = dict(separate.named_parameters())
    bounds = _bound(_multi_adapter_model(), batch, ids, backward=True)
    compared = 0
    for name, param in mixed.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
            continue
        dense = param.grad.to_dense() if param.grad.is_sparse else param.grad
        other = grads[name].grad.to_dense() if grads[name].grad.is_sparse else grads[name].grad
        assert_within_bound(dense, other, bounds[name], BACKWARD_ROUNDINGS, name=name)
        assert_bound_can_fail(other, bounds[name], BACKWARD_ROUNDINGS, name=name)  # a zeroed gradient fails
        compared += 1
    assert compared >= 10


def test_routed_training_runs_with_dropout():
    config = LoraConfig(r=4, target_modules=ALL_TARGETS, lora_dropout=0.2)
    model = get_peft_model(make_model(), config, "a")
    model.add_adapter("b", config)
    losses = train_steps(model, steps=4, adapter_ids=torch.tensor([0, 1] * 8))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.base_model.mlp[0].lora_B["b"].abs().sum() > 0  # the second adapter trained too


def test_bad_adapter_ids_are_refused():
    model = _multi_adapter_model()
    batch = make_batch(batch=4)
    with pytest.raises(IndexError, match=r"adapter id 3 is out of range.*\['de', 'fr', 'es'\]"):
        model(*batch, adapter_ids=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(IndexError, match="adapter id -2"):
        model(*batch, adapter_ids=[0, -2, 0, 0])
    with pytest.raises(TypeError, match="adapter_ids must be integers"):
        model(*batch, adapter_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="needs the input's leading dimension to be the 3 routed samples, but it is 4"):
        model(*batch, adapter_ids=torch.tensor([0, 1, 2]))


class _Flattening(nn.Module):
    """Flattens [B, T, K] to [B·T, K] before its linear layer: routing cannot map rows."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return self.proj(x.reshape(-1, 4))


def test_layer_that_loses_the_sample_dimension_says_so():
    model = get_peft_model(_Flattening(), LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="proj: per-sample routing needs the input's leading dimension"):
        model(torch.randn(2, 5, 4), adapter_ids=torch.tensor([0, 0]))


def test_a_module_cannot_be_both_adapted_and_saved_whole():
    model = _multi_adapter_model()
    with pytest.raises(ValueError, match="'mlp.0' is adapted by LoRA"):
        model.add_adapter("it", LoraConfig(target_modules=["item"], modules_to_save=["mlp.0"]))
    with pytest.raises(ValueError, match="'mlp.2' is saved whole"):
        model.add_adapter("it", LoraConfig(target_modules=["mlp.2"]))
    assert model.adapter_names == ("de", "fr", "es")


def test_routing_a_merged_model_is_refused():
    model = _multi_adapter_model()
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged; unmerge before routing"):
        model(*make_batch(batch=2), adapter_ids=torch.tensor([0, 1]))


def test_grouped_batch_reorders_per_sample_tensors_only_and_restores_nested_outputs():
    """Tensors with first dimension B, nested in lists, tuples and dicts, are sorted by adapter
    (stably); other values pass as they are; restore puts outputs back in the caller's order;
    a torchrec jagged batch (a stand-in of that name) is refused by name."""
    ids = torch.tensor([2, 0, -1, 1, 0, 2, 1, -1, 0, 2])
    rows = torch.arange(10.0).unsqueeze(1).expand(10, 3)
    other = torch.arange(4)  # not per-sample
    args, kwargs, sorted_ids, restore = grouped_batch(({"rows": [rows]}, other), {"scale": 2.0}, ids)
    order = torch.argsort(ids, stable=True)
    assert torch.equal(sorted_ids, ids[order]) and torch.equal(args[0]["rows"][0], rows[order])
    assert args[1] is other and kwargs == {"scale": 2.0}
    back = restore({"score": args[0]["rows"][0][:, 0], "pair": (sorted_ids, other)})
    assert torch.equal(back["score"], rows[:, 0]) and torch.equal(back["pair"][0], ids) and back["pair"][1] is other

    class KeyedJaggedTensor:  # what the check looks for: the type's name
        pass

    with pytest.raises(TypeError, match="KeyedJaggedTensor input cannot be reordered"):
        grouped_batch((rows, KeyedJaggedTensor()), {}, ids)
    unchanged = grouped_batch((rows,), {}, ids.sort().values)  # grouped already: nothing copied
    assert unchanged[0][0] is rows
