"""Every module that holds adapters — each registered LoRA wrapper type and ModulesToSaveWrapper —
implements the AdapterHolder protocol: each protocol method is called on a small module and its
result checked against what the protocol says it returns."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from recpeft.layers import (
    LORA_WRAPPERS,
    AdapterHolder,
    AdapterStateError,
    LoraLayer,
    LoraWeightLayer,
    ModulesToSaveWrapper,
    wrapper_for,
)

RANK = 4  # a multiple of 4, as torchrec's fused kernels want
#: float32 unit roundoff
U32 = 2.0**-24


def _identity(out):
    return out


@dataclass
class Case:
    """A small module, a batch for it, and how to make its output one dense tensor."""

    make: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    saved_whole: bool = False  # wrapped by ModulesToSaveWrapper rather than a LoRA wrapper
    dense: Callable = _identity


def _x():
    return (torch.randn(3, 6, generator=torch.Generator().manual_seed(0)),)


def _g():
    return torch.Generator().manual_seed(0)


def _plain_cases() -> dict[str, Case]:
    return {
        "linear": Case(lambda: nn.Linear(6, 5), _x),
        "embedding": Case(lambda: nn.Embedding(10, 4), lambda: (torch.tensor([[1, 2], [3, 1]]),)),
        "embedding_bag": Case(
            lambda: nn.EmbeddingBag(10, 4, mode="sum"), lambda: (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]))
        ),
        "conv1d": Case(lambda: nn.Conv1d(3, 5, 3, padding=1), lambda: (torch.randn(2, 3, 7, generator=_g()),)),
        "conv2d": Case(lambda: nn.Conv2d(3, 4, 3, stride=2), lambda: (torch.randn(2, 3, 6, 5, generator=_g()),)),
        "saved_linear": Case(lambda: nn.Linear(6, 5), _x, saved_whole=True),
        "saved_sparse_embedding": Case(
            lambda: nn.Embedding(10, 4, sparse=True), lambda: (torch.tensor([1, 2, 1]),), saved_whole=True
        ),
    }


def _torchrec_cases() -> dict[str, Case]:
    try:
        from torchrec import (
            EmbeddingBagCollection,
            EmbeddingBagConfig,
            EmbeddingCollection,
            EmbeddingConfig,
            KeyedJaggedTensor,
        )
    except ImportError:
        return {}

    def kjt():
        return (KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2, 3]), torch.tensor([2, 1])),)

    return {
        "embedding_bag_collection": Case(
            lambda: EmbeddingBagCollection(
                [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
            ),
            kjt,
            dense=lambda out: out.values(),
        ),
        "embedding_collection": Case(
            lambda: EmbeddingCollection(
                [EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
            ),
            kjt,
            dense=lambda out: torch.cat([out[k].values() for k in sorted(out)]),
        ),
    }


CASES = {**_plain_cases(), **_torchrec_cases()}


def _holder(case: Case, init, seed: int = 0) -> AdapterHolder:
    """The case's module wrapped, holding adapter "a" (active)."""
    torch.manual_seed(seed)
    module = case.make()
    if case.saved_whole:
        holder = ModulesToSaveWrapper(module, "m")
        holder.update("a")
    else:
        holder = wrapper_for(module)(module, "m")
        parts = holder.part_names(module)
        if parts is None:
            holder.update_layer("a", r=RANK, scale=1.5, dropout=0.0, init=init)
        else:
            holder.update_parts("a", {p: (RANK, 1.5) for p in parts}, init=init)
    holder.set_active_adapters(["a"])
    return holder


def _output(case: Case, holder: AdapterHolder) -> torch.Tensor:
    return case.dense(holder(*case.batch()))


def test_every_registered_wrapper_type_has_a_case():
    covered = {type(_holder(case, init=True)) for case in CASES.values()}
    assert ModulesToSaveWrapper in covered
    assert set(LORA_WRAPPERS.values()) <= covered  # a new wrapper type needs its case here


@pytest.mark.parametrize("name", list(CASES))
def test_names_activity_and_unwrap(name):
    case = CASES[name]
    holder = _holder(case, init=False)
    original = holder.unwrap(keep_trained=False)
    assert isinstance(holder, AdapterHolder) and isinstance(holder, LoraLayer) != case.saved_whole
    assert holder.adapter_names() == ["a"] and holder.has_adapter("a") and not holder.has_adapter("b")
    holder.set_active_adapters(["b", "a"])  # names held elsewhere are dropped here
    assert holder.active_adapters == ["a"] and holder.pending_adapters() == ["a"]
    holder.disabled = True
    assert holder.pending_adapters() == [] and holder.active_routing() is None
    assert torch.equal(_output(case, holder), case.dense(original(*case.batch())))  # the frozen module alone
    holder.disabled = False
    trained = holder.unwrap(keep_trained=True)
    assert trained is (holder.modules_to_save["a"] if case.saved_whole else original)
    assert not any(p is q for p in holder.adapter_parameters("a") for q in original.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_parameters_are_the_adapter_parameters_with_sparse_gradients(name):
    case = CASES[name]
    holder = _holder(case, init=False)
    params = holder.adapter_parameters("a")
    assert params and all(isinstance(p, nn.Parameter) for p in params)
    sparse = holder.sparse_parameters("a")
    assert {id(p) for p in sparse} <= {id(p) for p in params}
    _output(case, holder).pow(2).sum().backward()
    with_sparse_grad = {id(p) for p in params if p.grad is not None and p.grad.is_sparse}
    assert with_sparse_grad == {id(p) for p in sparse}
    assert bool(sparse) == (name not in ("linear", "conv1d", "conv2d", "saved_linear"))


@pytest.mark.parametrize("name", list(CASES))
def test_untouched_parameters_count_the_zero_rows_of_embedding_adapters(name):
    case = CASES[name]
    holder = _holder(case, init=True)  # embedding adapters: A = 0, no row touched yet
    sparse = holder.sparse_parameters("a")
    expected = 0 if case.saved_whole else sum(p.numel() for p in sparse)
    assert holder.untouched_parameters("a") == expected
    if not case.saved_whole and sparse:
        with torch.no_grad():
            sparse[0][1].fill_(0.5)  # one row touched
        assert holder.untouched_parameters("a") == expected - RANK


@pytest.mark.parametrize("name", list(CASES))
def test_merge_unmerge_and_delete(name):
    case = CASES[name]
    holder = _holder(case, init=False)
    frozen = [p.detach().clone() for p in holder.unwrap(keep_trained=False).parameters()]
    holder.merge(["a", "b"])
    merged = [p.detach().clone() for p in holder.unwrap(keep_trained=False).parameters()]
    if case.saved_whole:  # a trained copy is not a delta: nothing merges
        assert holder.merged_adapters == []
        assert all(torch.equal(m, f) for m, f in zip(merged, frozen))
    else:
        assert holder.merged_adapters == ["a"]
        assert not all(torch.equal(m, f) for m, f in zip(merged, frozen))
        with pytest.raises(RuntimeError, match="are merged; unmerge before routing"):
            holder.refuse_routing_when_merged()
        with pytest.raises(ValueError, match="is merged; unmerge it before deleting"):
            holder.delete_adapter("a")
    holder.unmerge()
    assert holder.merged_adapters == []
    for restored, f, m in zip(holder.unwrap(keep_trained=False).parameters(), frozen, merged):
        # (W + Δ) − Δ: two roundings, each at most u·|its result|, with |Δ| = |W' − W| to rounding
        bound = 4 * U32 * (f.abs() + (m - f).abs()) + 1e-30
        assert bool(((restored.detach() - f).abs() <= bound).all())
    holder.delete_adapter("a")
    assert holder.adapter_names() == [] and holder.active_adapters == []


@pytest.mark.parametrize("name", list(CASES))
def test_export_check_and_load_round_trip(name):
    case = CASES[name]
    source = _holder(case, init=False, seed=0)
    exported = source.export_adapter("a")
    assert exported and all(isinstance(v, torch.Tensor) for v in exported.values())
    target = _holder(case, init=False, seed=1)
    target.unwrap(keep_trained=False).load_state_dict(source.unwrap(keep_trained=False).state_dict())
    target.check_adapter_state("a", exported, "file")
    target.load_adapter_state("a", exported)
    torch.testing.assert_close(_output(case, target), _output(case, source), rtol=0, atol=0)

    key = max(k for k in exported if k.endswith("weight"))  # B (or the copy's weight): in every on-disk form
    with pytest.raises(AdapterStateError, match=rf"^file: missing key m\.{re.escape(key)}$"):
        target.check_adapter_state("a", {k: v for k, v in exported.items() if k != key}, "file")
    with pytest.raises(AdapterStateError, match=r"^file: unexpected key m\.zzz"):
        target.check_adapter_state("a", {**exported, "zzz": torch.zeros(1)}, "file")
    misshapen = torch.zeros(exported[key].shape[0] + 1, *exported[key].shape[1:])
    with pytest.raises(AdapterStateError, match=rf"^file: m\.{re.escape(key)} has shape"):
        target.check_adapter_state("a", {**exported, key: misshapen}, "file")


def test_the_two_lora_families_are_siblings():
    """No subclass changes the types of what it inherits: the per-table collection family is not
    built on the one-weight family's ParameterDicts and scalar scales."""
    pytest.importorskip("torchrec")
    from recpeft.layers.torchrec import LoraCollectionLayer

    assert not issubclass(LoraCollectionLayer, LoraWeightLayer) and issubclass(LoraCollectionLayer, LoraLayer)
    holder = _holder(CASES["embedding_bag_collection"], init=True)
    assert isinstance(holder.lora_A, nn.ModuleDict) and isinstance(holder.scaling["a"], dict)
    assert not hasattr(holder, "base_weight") and not hasattr(holder, "lora_dropout")
    layer = _holder(CASES["embedding"], init=True)
    assert isinstance(layer.lora_A, nn.ParameterDict) and isinstance(layer.scaling["a"], float)
