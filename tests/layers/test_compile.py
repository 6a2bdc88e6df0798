"""torch.compile sees through the adapters of a torchrec DLRM: no graph break from reading the
routing (a ContextVar, which Dynamo cannot trace, is read only while some routing is open), and
a compiled forward gives the eager numbers, unrouted and routed."""

from __future__ import annotations

import torch
import torch._dynamo as dynamo
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recpeft import LoraConfig, get_peft_model

from reference_math import abs_twin, assert_within_bound
from torchrec_models import make_batch, make_dlrm

#: the collection of tables and two Linear layers (dense arch, over arch)
TARGETS = ["embedding_bag_collection", "dense_arch.model._mlp.0._linear", "over_arch.model.1"]
# Roundings along the small DLRM (see tests/peft/test_torchrec_sharded.py): ≤ 256 covers it.
DLRM_ROUNDINGS = 256


def _adapted(seed: int = 0):
    model = get_peft_model(make_dlrm("dlrm", seed=seed), LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)  # adapters that change the outputs
    return model


def test_dynamo_finds_no_graph_break_in_the_adapted_dlrm():
    model = _adapted()
    dense, sparse, _ = make_batch()
    explained = dynamo.explain(model)(dense, sparse)
    reasons = [b.reason.split("\n")[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def test_compiled_forward_matches_eager_unrouted_and_routed():
    dynamo.reset()
    model = _adapted()
    model.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS))
    dense, sparse, _ = make_batch(batch=12, seed=5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    twin = abs_twin(model, dtype=None)  # float32: torchrec's collections run in float32 only
    ids = torch.tensor([0, 1, -1] * 4)
    with torch.no_grad():
        eager, got = model(dense, sparse), compiled(dense, sparse)
        assert_within_bound(got, eager, twin(dense.abs(), sparse), DLRM_ROUNDINGS, name="unrouted")
        eager_routed, got_routed = model(dense, sparse, adapter_ids=ids), compiled(dense, sparse, adapter_ids=ids)
        bound = twin(dense.abs(), sparse, adapter_ids=ids)
    assert_within_bound(got_routed, eager_routed, bound, DLRM_ROUNDINGS, name="routed")
    assert not torch.allclose(eager_routed, eager)  # routing changed the outputs: it was not ignored


def test_torch_export_of_the_adapted_dlrm_gives_the_eager_numbers():
    """torch.export (non-strict: torchrec's KeyedJaggedTensor is traced through its Python) of
    the DLRM with unmerged Linear and collection adapters; the exported program, run on another
    batch of the same shapes (the program is specialised to the ids' count), gives the eager
    model's logits."""
    model = _adapted().eval()
    dense, sparse, _ = make_batch(batch=12, seed=5)
    exported = torch.export.export(model, (dense, sparse), strict=False)
    g = torch.Generator().manual_seed(6)
    other_dense = torch.randn(dense.shape, generator=g)
    lengths = sparse.length_per_key()
    shuffled = [v[torch.randperm(v.numel(), generator=g)] for v in sparse.values().split(lengths)]
    other_sparse = KeyedJaggedTensor(sparse.keys(), torch.cat(shuffled), lengths=sparse.lengths())  # same ids per key
    with torch.no_grad():
        eager, got = model(other_dense, other_sparse), exported.module()(other_dense, other_sparse)
        bound = abs_twin(model, dtype=None)(other_dense.abs(), other_sparse)
    assert_within_bound(got, eager, bound, DLRM_ROUNDINGS, name="exported")
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(eager, model(other_dense, other_sparse))  # the adapters count
