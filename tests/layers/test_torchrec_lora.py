"""LoRA on torchrec's EmbeddingBagCollection and EmbeddingCollection, unsharded: identity at init
bit for bit, outputs and gradients against float64 per-bag formulas (sum, mean, weighted, shared
features, per-table ranks), table targeting, merging, saving, routing, and torchrec's DLRM family
through get_peft_model → training → save → load → merge."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from recpeft import LoraAdamW, LoraConfig, PeftModel, get_peft_model
from recpeft.layers.base import AdapterStateError
from recpeft.layers.torchrec import LoraEmbeddingBagCollection, LoraEmbeddingCollection
from recpeft.peft import CONFIG_NAME, WEIGHTS_NAME

from reference_math import (
    abs_twin,
    assert_bound_can_fail,
    assert_normwise_close,
    assert_within_bound,
    dense_grad,
    leaf64,
    naive_bag,
)
from torchrec_models import make_batch, make_dlrm, make_kjt, slice_batch, table_configs

TABLE_NAMES = ["t_user", "t_item", "t_cat", "t_shop"]


class Holder(nn.Module):
    """A model whose one module is the collection under test (``coll``)."""

    def __init__(self, collection: nn.Module):
        super().__init__()
        self.coll = collection

    def forward(self, features):
        return self.coll(features)


def _collection(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "ec":
        return EmbeddingCollection(
            [
                EmbeddingConfig(
                    name=c.name,
                    embedding_dim=c.embedding_dim,
                    num_embeddings=c.num_embeddings,
                    feature_names=c.feature_names,
                )
                for c in table_configs()
            ]
        )
    weighted = kind == "ebc_weighted"  # per-id weights need sum pooling (nn.EmbeddingBag and TBE alike)
    return EmbeddingBagCollection(table_configs(pooling=not weighted), is_weighted=weighted)


def _kjt(kind: str, batch: int = 12, seed: int = 3) -> KeyedJaggedTensor:
    return make_kjt(batch, torch.Generator().manual_seed(seed), weighted=kind == "ebc_weighted")


def _adapter_table(layer, adapter: str, table: str) -> torch.Tensor:
    group = layer.group_for(layer.ranks[adapter][table])
    collection = layer.lora_A[adapter][group]
    tables = collection.embedding_bags if hasattr(collection, "embedding_bags") else collection.embeddings
    return tables[table].weight


def _base_table(collection: nn.Module, table: str) -> torch.Tensor:
    tables = collection.embedding_bags if hasattr(collection, "embedding_bags") else collection.embeddings
    return tables[table].weight


# Roundings along the longest chain of a collection (reference_math.assert_within_bound): a bag of
# ≤ 3 ids (sum, /n), its pooled A·B (r ≤ 4), ·s, + the pooled table, merged rows E + s·A·B (r + 2).
COLLECTION_ROUNDINGS = 4 + 4 + 4 + 2 + 6
# The DLRM family: dense arch 4 + 16 (+ LoRA r + 3) and bags 14 give x0 ≤ 30; each of the two
# low-rank cross layers x0·(W·V·xl + b) + xl multiplies (40 + 4 + 3 roundings) so counts add:
# x1 ≤ 107, x2 ≤ 184; the over arch (40 + 16 inputs, LoRA) ≤ 254.
DLRM_ROUNDINGS = 256
# Gradients of Σ y²: 2·y·∂y/∂θ summed over the batch (≤ 32 rows).
DLRM_GRAD_ROUNDINGS = 2 * DLRM_ROUNDINGS + 1 + 32


def _kjt_abs(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same ids with |weights|, for an absolute-value twin."""
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values(), kjt.lengths(), weights=None if weights is None else weights.detach().abs()
    )


def _twin(model):
    """The absolute-value twin (reference_math.abs_twin), in float32: torchrec's collections run
    in their configured dtype."""
    return abs_twin(model, dtype=None)


def _values(out):
    return torch.cat([out[k].values() for k in out]) if isinstance(out, dict) else out.values()


def _assert_same_output(got, expected, exact: bool = True, bound=None, n: int = COLLECTION_ROUNDINGS):
    """Bit for bit, or within γ_n·bound (bound: the absolute-value twin's output)."""
    if not exact:
        return assert_within_bound(_values(got), _values(expected), _values(bound), n, name="output")
    check = torch.equal
    if isinstance(expected, dict):  # EmbeddingCollection: Dict[str, JaggedTensor]
        assert list(got) == list(expected)
        for key in expected:
            assert torch.equal(got[key].lengths(), expected[key].lengths()), key
            assert check(got[key].values(), expected[key].values()), key
    else:
        assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
        assert check(got.values(), expected.values())


# ---- the forward, at init and against float64 formulas -------------------------------------------


@pytest.mark.parametrize("kind", ["ebc", "ebc_weighted", "ec"])
def test_output_at_init_equals_the_base_collection_bit_for_bit(kind):
    base = _collection(kind)
    kjt = _kjt(kind)
    expected = base(kjt)
    model = get_peft_model(Holder(copy.deepcopy(base)), LoraConfig(r=4, target_modules=["t_user", "t_item", "t_cat"]))
    wrapper = LoraEmbeddingCollection if kind == "ec" else LoraEmbeddingBagCollection
    assert isinstance(model.base_model.coll, wrapper)
    _assert_same_output(model(kjt), expected)


def _naive_outputs(kind, base, layer, kjt, scales):
    """Per output key, the float64 formula; returns (outputs, {table: (A64, B64)}, the per-id
    weights as a float64 leaf or None)."""
    leaves = {
        t: (leaf64(_adapter_table(layer, "default", t)), leaf64(layer.lora_B["default"][t]))
        for t in layer.tables("default")
    }
    configs = {
        f: c
        for c in (base.embedding_bag_configs() if kind != "ec" else base.embedding_configs())
        for f in c.feature_names
    }
    per_key = kjt.to_dict()
    weights64 = leaf64(kjt.weights()) if kind == "ebc_weighted" else None
    offsets = dict(zip(kjt.keys(), kjt.offset_per_key()))
    outputs = []
    for feature in kjt.keys():
        config = configs[feature]
        E = _base_table(base, config.name).double()
        A, B = leaves.get(config.name, (E.new_zeros(E.shape[0], 1), E.new_zeros(1, E.shape[1])))
        s = scales.get(config.name, 0.0)
        jt = per_key[feature]
        bags = [t.tolist() for t in jt.to_dense()]
        if kind == "ec":  # one row per id
            outputs.append(
                torch.stack([E[i] + s * A[i] @ B for bag in bags for i in bag])
                if jt.values().numel()
                else E.new_zeros(0, E.shape[1])
            )
            continue
        weights = None
        if kind == "ebc_weighted":  # the float64 leaf's entries, bag by bag, so its gradient is checked too
            flat = weights64[offsets[feature] : offsets[feature] + jt.values().numel()]
            weights = list(torch.split(flat, jt.lengths().tolist()))
        mode = "mean" if config.pooling == PoolingType.MEAN else "sum"
        outputs.append(naive_bag(bags, E, A, B, s, mode=mode, weights=weights))
    return outputs, leaves, weights64


@pytest.mark.parametrize("kind", ["ebc", "ebc_weighted", "ec"])
def test_outputs_and_gradients_match_float64_formulas(kind):
    """A and B random (init_lora_weights=False), per-table ranks and alphas; loss Σ out·g."""
    base = _collection(kind)
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["t_user", "t_item", "t_cat"],
        rank_pattern={"t_item": 2},
        alpha_pattern={"coll.t_cat": 1.5},
        init_lora_weights=False,
    )
    model = get_peft_model(Holder(copy.deepcopy(base)), config)
    layer = model.base_model.coll
    scales = {"t_user": 2.0, "t_item": 3.0, "t_cat": 0.5}
    assert layer.scaling["default"] == scales and layer.ranks["default"] == {"t_user": 3, "t_item": 2, "t_cat": 3}
    kjt = _kjt(kind, batch=9, seed=11)
    if kind == "ebc_weighted":  # per-id weights from a trainable upstream module need their gradient too
        kjt = KeyedJaggedTensor.from_lengths_sync(
            kjt.keys(), kjt.values(), kjt.lengths(), weights=kjt.weights().requires_grad_(True)
        )
    out = model(kjt)
    got = [out[k].values() for k in kjt.keys()] if kind == "ec" else list(out.values().split(out.length_per_key(), 1))
    grads = [torch.randn_like(g) for g in got]
    sum((g * w).sum() for g, w in zip(got, grads)).backward()

    twin, kjt_abs = _twin(model), _kjt_abs(kjt)  # the bound: the same on absolute values
    if kind == "ebc_weighted":
        kjt_abs.weights().requires_grad_(True)
    out_abs = twin(kjt_abs)
    bound = (
        [out_abs[k].values() for k in kjt.keys()]
        if kind == "ec"
        else list(out_abs.values().split(out_abs.length_per_key(), 1))
    )
    sum((b * w.abs()).sum() for b, w in zip(bound, grads)).backward()
    twin_layer = twin.base_model.coll
    # forward: COLLECTION_ROUNDINGS; gradients: + the sum over ≤ 2·9 bags and the D = 8 outputs
    n = COLLECTION_ROUNDINGS + 18 + 8
    expected, leaves, weights64 = _naive_outputs(kind, base, layer, kjt, scales)
    for key, g, e, b in zip(kjt.keys(), got, expected, bound):
        assert_within_bound(g, e, b.detach(), n, computed=1, name=key)
    sum((e * w.double()).sum() for e, w in zip(expected, grads)).backward()
    for table, (a64, b64) in leaves.items():
        grad_a = _adapter_table(layer, "default", table).grad
        assert grad_a.is_sparse, table  # rows of the batch only, never a dense V×r buffer
        assert_within_bound(
            grad_a, a64.grad, _adapter_table(twin_layer, "default", table).grad, n, computed=1, name=table
        )
        bound_b = twin_layer.lora_B["default"][table].grad
        assert_within_bound(layer.lora_B["default"][table].grad, b64.grad, bound_b, n, computed=1, name=table)
        assert_bound_can_fail(b64.grad, bound_b, n, computed=1, name=table)
    assert all(p.grad is None for p in layer.base_layer.parameters())  # the frozen tables get nothing
    if kind == "ebc_weighted":
        assert_within_bound(kjt.weights().grad, weights64.grad, kjt_abs.weights().grad, n, computed=1, name="weights")


def test_gradient_of_an_adapter_table_touches_only_the_batch_rows():
    model = get_peft_model(Holder(_collection("ebc")), LoraConfig(r=4, target_modules=["t_item"]))
    kjt = _kjt("ebc", batch=5, seed=2)
    model(kjt).values().pow(2).sum().backward()
    grad = _adapter_table(model.base_model.coll, "default", "t_item").grad.coalesce()
    batch_ids = torch.cat([kjt["item"].values(), kjt["item_hist"].values()]).unique()
    assert torch.equal(grad.indices()[0].unique(), batch_ids)


# ---- targeting tables -----------------------------------------------------------------------------


def test_tables_are_targeted_by_name_suffix_class_and_exclusion():
    def adapted(config):
        model = get_peft_model(Holder(_collection("ebc")), config)
        return model.base_model.coll.tables("default"), model

    assert adapted(LoraConfig(target_modules=["t_item"]))[0] == ["t_item"]
    assert adapted(LoraConfig(target_modules=["coll.t_user", "t_shop"]))[0] == ["t_user", "t_shop"]
    assert adapted(LoraConfig(target_modules=[EmbeddingBagCollection]))[0] == TABLE_NAMES
    assert adapted(LoraConfig(target_modules=["coll"], exclude_modules=["t_cat"]))[0] == ["t_user", "t_item", "t_shop"]
    assert adapted(LoraConfig(target_modules=r"coll\.t_(user|cat)"))[0] == ["t_user", "t_cat"]
    tables, model = adapted(LoraConfig(r=4, target_modules=["coll"], rank_pattern={"t_item": 2}))
    assert model.base_model.coll.lora_B["default"]["t_item"].shape == (2, 8)
    assert model.base_model.coll.lora_B["default"]["t_user"].shape == (4, 8)


def test_a_pattern_that_matches_no_table_lists_the_tables():
    with pytest.raises(
        ValueError,
        match=r"'t_usr' matched no module.*Did you mean: coll\.t_user.*Tables.*coll\.t_user, "
        r"coll\.t_item, coll\.t_cat, coll\.t_shop",
    ):
        get_peft_model(Holder(_collection("ebc")), LoraConfig(target_modules=["t_usr"]))


def test_the_collections_own_embedding_bags_are_not_targets():
    with pytest.raises(ValueError, match="'EmbeddingBag' matched no module"):
        get_peft_model(Holder(_collection("ebc")), LoraConfig(target_modules=[nn.EmbeddingBag]))


# ---- merging, saving, loading -----------------------------------------------------------------------


def _train(model, make_input, steps=3, lr=0.05):
    optimizer = LoraAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        out = model(make_input(step))
        values = torch.cat([jt.values() for jt in out.values()]) if isinstance(out, dict) else out.values()
        loss = (values.sum(1) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["ebc", "ebc_weighted", "ec"])
def test_merge_writes_e_plus_s_a_b_into_the_touched_rows_only(kind):
    base = _collection(kind)
    model = get_peft_model(
        Holder(copy.deepcopy(base)), LoraConfig(r=4, lora_alpha=8, target_modules=["t_user", "t_item"])
    )
    _train(model, lambda step: _kjt(kind, batch=4, seed=20 + step))
    layer = model.base_model.coll
    a = {t: _adapter_table(layer, "default", t).detach().clone() for t in layer.tables("default")}
    b = {t: layer.lora_B["default"][t].detach().clone() for t in layer.tables("default")}
    kjt = _kjt(kind, batch=10, seed=5)
    adapted = model(kjt)
    bound = _twin(model)(_kjt_abs(kjt))

    merged = model.merge_and_unload()
    assert type(merged.coll) is type(base)
    _assert_same_output(merged(kjt), adapted, exact=False, bound=bound)
    for table in TABLE_NAMES:
        before, after = _base_table(base, table), _base_table(merged.coll, table)
        if table not in a:
            assert torch.equal(after, before), table
            continue
        touched = (a[table] != 0).any(1)
        assert 0 < touched.sum() < touched.numel()
        expected = before.double() + 2.0 * a[table].double() @ b[table].double()
        bound = before.double().abs() + 2.0 * a[table].double().abs() @ b[table].double().abs()
        # E + s·A·B: r = 4 products and sums, ·s, + E
        assert_within_bound(after[touched], expected[touched], bound[touched], 4 + 2, computed=1, name=table)
        assert torch.equal(after[~touched], before[~touched]), table  # untouched rows are not even rewritten


def test_unmerge_restores_the_tables():
    base = _collection("ebc")
    model = get_peft_model(
        Holder(copy.deepcopy(base)), LoraConfig(r=4, target_modules=["coll"], init_lora_weights=False)
    )
    twin = _twin(model)
    twin.merge_adapter()  # |E| + s·|A|·|B|: what the merged tables' roundings are relative to
    model.merge_adapter()
    assert not torch.equal(_base_table(model.base_model.coll.base_layer, "t_user"), _base_table(base, "t_user"))
    model.unmerge_adapter()
    for table in TABLE_NAMES:
        # (E + s·A·B) − s·A·B: r + 2 roundings each way
        bound = _base_table(twin.base_model.coll.base_layer, table)
        got = _base_table(model.base_model.coll.base_layer, table)
        assert_within_bound(got, _base_table(base, table), bound, 2 * (4 + 2), computed=1, name=table)


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_save_writes_touched_rows_per_table_and_load_reproduces_outputs(kind, tmp_path):
    base = _collection(kind)
    model = get_peft_model(Holder(copy.deepcopy(base)), LoraConfig(r=4, target_modules=["t_user", "t_cat"]))
    _train(model, lambda step: _kjt(kind, batch=3, seed=40 + step))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    prefix = "base_model.model.coll."
    assert sorted(tensors) == sorted(
        f"{prefix}{t}.{k}"
        for t in ["t_user", "t_cat"]
        for k in (
            "lora_embedding_A.indices",
            "lora_embedding_A.rows",
            "lora_embedding_A.shape",
            "lora_embedding_B.weight",
        )
    )
    a = _adapter_table(model.base_model.coll, "default", "t_user").detach()
    touched = (a != 0).any(1).nonzero().squeeze(1)
    assert torch.equal(tensors[prefix + "t_user.lora_embedding_A.indices"], touched)
    assert torch.equal(tensors[prefix + "t_user.lora_embedding_A.rows"], a[touched])
    assert tensors[prefix + "t_user.lora_embedding_A.shape"].tolist() == [400, 4]

    loaded = PeftModel.from_pretrained(Holder(copy.deepcopy(base)), tmp_path)
    kjt = _kjt(kind, batch=8, seed=9)
    _assert_same_output(loaded(kjt), model(kjt))


def test_a_file_that_does_not_fit_names_the_table_and_leaves_the_model(tmp_path):
    model = get_peft_model(Holder(_collection("ebc")), LoraConfig(r=4, target_modules=["t_user", "t_cat"]))
    _train(model, lambda step: _kjt("ebc", batch=3, seed=40 + step))
    model.save_pretrained(tmp_path)
    other = Holder(
        EmbeddingBagCollection(
            [
                EmbeddingBagConfig(
                    name=c.name,
                    embedding_dim=8,
                    feature_names=c.feature_names,
                    num_embeddings=c.num_embeddings + (c.name == "t_cat"),
                )
                for c in table_configs()
            ]
        )
    )
    with pytest.raises(
        AdapterStateError,
        match=r"coll\.t_cat\.lora_embedding_A was saved for a table of shape \(300, 4\) "
        r"but the model's is \(301, 4\)",
    ):
        PeftModel.from_pretrained(other, tmp_path)
    assert isinstance(other.coll, EmbeddingBagCollection)

    target = get_peft_model(Holder(_collection("ebc")), LoraConfig(r=4, target_modules=["t_user"]))
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(
        AdapterStateError, match=r"unexpected key coll\.t_cat\.lora_embedding_A\.indices .*adapts tables \['t_user'\]"
    ):
        target.load_adapter_state("default", tensors, "file")
    tensors.pop("base_model.model.coll.t_cat.lora_embedding_B.weight")
    retarget = get_peft_model(Holder(_collection("ebc")), LoraConfig(r=4, target_modules=["t_user", "t_cat"]))
    with pytest.raises(AdapterStateError, match=r"missing key coll\.t_cat\.lora_embedding_B\.weight"):
        retarget.load_adapter_state("default", tensors, "file")


def test_trainable_and_touched_counts():
    model = get_peft_model(Holder(_collection("ebc")), LoraConfig(r=4, target_modules=["t_user", "t_item"]))
    counts = model.get_nb_trainable_parameters()
    b_params = 2 * 4 * 8
    assert counts["trainable"] == (400 + 500) * 4 + b_params and counts["touched"] == b_params
    _train(model, lambda step: _kjt("ebc", batch=2, seed=step), steps=1)
    layer = model.base_model.coll
    touched_rows = sum(int((_adapter_table(layer, "default", t) != 0).any(1).sum()) for t in ["t_user", "t_item"])
    assert touched_rows > 0
    assert model.get_nb_trainable_parameters()["touched"] == b_params + 4 * touched_rows


# ---- torchrec's DLRM family -----------------------------------------------------------------------


def _bce_steps(model, steps, seed=1, adapter_ids=None):
    optimizer = LoraAdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        dense, sparse, labels = make_batch(batch=16, seed=seed)  # one batch, fitted: its loss must fall
        kwargs = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse, **kwargs).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["dlrm", "dcn", "projection"])
def test_dlrm_family_trains_saves_loads_and_merges(kind, tmp_path, capsys):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[EmbeddingBagCollection, nn.Linear])
    model = get_peft_model(make_dlrm(kind), config)
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    layer = model.base_model.sparse_arch.embedding_bag_collection
    assert isinstance(layer, LoraEmbeddingBagCollection) and layer.tables("default") == TABLE_NAMES
    dense, sparse, _ = make_batch(batch=32, seed=50)
    before = model(dense, sparse).detach()
    assert torch.equal(before, make_dlrm(kind)(dense, sparse))  # identity at init, through the whole model

    losses = _bce_steps(model, steps=4)
    assert losses[-1] < losses[0]
    after = model(dense, sparse).detach()
    assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path)
    saved_targets = json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"]
    assert "sparse_arch.embedding_bag_collection.t_item" in saved_targets and "over_arch.model.1" in saved_targets

    loaded = PeftModel.from_pretrained(make_dlrm(kind), tmp_path)
    assert torch.equal(loaded(dense, sparse), after)
    bound = _twin(loaded)(dense.abs(), sparse).detach()
    merged = loaded.merge_and_unload()
    assert type(merged.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection
    assert_within_bound(merged(dense, sparse), after, bound, DLRM_ROUNDINGS, name="merged")
    assert_bound_can_fail(after, bound, DLRM_ROUNDINGS)


def _two_adapter_dlrm(init=False):
    model = get_peft_model(
        make_dlrm("dcn"),
        LoraConfig(
            r=4,
            target_modules=["t_user", "t_item", "over_arch.model.1"],
            modules_to_save=["inter_arch.crossnet"],
            init_lora_weights=init,
        ),
        "de",
    )
    model.add_adapter(
        "fr",
        LoraConfig(
            r=2,
            lora_alpha=6,
            target_modules=["t_cat", "t_item", "dense_arch.model._mlp.0._linear"],
            init_lora_weights=init,
        ),
    )
    return model


def test_routing_a_mixed_batch_equals_each_sample_through_its_own_merged_model():
    model = _two_adapter_dlrm()
    with torch.no_grad():  # the crossnet copy of "de" differs from the base
        model.base_model.inter_arch.crossnet.modules_to_save["de"].bias[0].add_(0.3)
    dense, sparse, _ = make_batch(batch=24, seed=7)
    ids = torch.randint(-1, 2, (24,), generator=torch.Generator().manual_seed(4))
    routed = model(dense, sparse, adapter_ids=ids)
    merged = {-1: make_dlrm("dcn")(dense, sparse)}
    for index, name in enumerate(model.adapter_names):
        single = copy.deepcopy(model)
        single.set_adapter(name)
        merged[index] = single.merge_and_unload()(dense, sparse)
    expected = torch.stack([merged[int(a)][i] for i, a in enumerate(ids)])
    bound = _twin(model)(dense.abs(), sparse, adapter_ids=ids).detach()
    assert_within_bound(routed, expected, bound, DLRM_ROUNDINGS, name="routed")
    wrong = torch.stack([merged[(int(a) + 2) % 3 - 1][i] for i, a in enumerate(ids)])  # each row's neighbour
    with pytest.raises(AssertionError, match="out of bound"):
        assert_within_bound(routed, wrong, bound, DLRM_ROUNDINGS)


def test_routed_training_gradients_equal_separate_per_adapter_runs():
    batch = make_batch(batch=18, seed=8)
    ids = torch.tensor([0] * 6 + [1] * 6 + [-1] * 6)
    mixed = _two_adapter_dlrm()
    dense, sparse, _ = batch
    mixed(dense, sparse, adapter_ids=ids).pow(2).sum().backward()
    separate = _two_adapter_dlrm()
    for index, name in enumerate(separate.adapter_names):
        sub_dense, sub_sparse, _ = slice_batch(batch, 6 * index, 6 * index + 6)
        separate.set_adapter(name)
        separate(sub_dense, sub_sparse).pow(2).sum().backward()
    grads = dict(separate.named_parameters())
    twin = _twin(_two_adapter_dlrm())
    twin(dense.abs(), sparse, adapter_ids=ids).pow(2).sum().backward()
    bounds = dict(twin.named_parameters())
    compared = 0
    for name, param in mixed.named_parameters():
        if ".lora_" not in name:
            continue
        other = grads[name].grad
        mine = param.grad
        assert (mine is None) == (other is None), name
        if mine is not None:
            assert_within_bound(mine, other, bounds[name].grad, DLRM_GRAD_ROUNDINGS, name=name)
            assert_normwise_close(mine, other, name=name)  # the cross layers make the bound vacuous
            with pytest.raises(AssertionError, match="exceeds"):
                assert_normwise_close(torch.zeros_like(dense_grad(other)), other)  # a zeroed gradient fails
            compared += 1
    assert compared == 12  # per adapter: A and B of two tables and of one linear layer


@pytest.mark.parametrize("kind", ["ebc_weighted", "ec"])
def test_routing_a_collection_equals_each_sample_through_its_own_merged_collection(kind):
    base = _collection(kind)
    model = get_peft_model(
        Holder(copy.deepcopy(base)), LoraConfig(r=3, target_modules=["t_user", "t_item"], init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=2, target_modules=["t_item", "t_shop"], init_lora_weights=False))
    kjt = _kjt(kind, batch=10, seed=13)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1, 0])
    routed = model(kjt, adapter_ids=ids)
    bound = _twin(model)(_kjt_abs(kjt), adapter_ids=ids)
    merged = {-1: base(kjt)}
    for index, name in enumerate(model.adapter_names):
        single = copy.deepcopy(model)
        single.set_adapter(name)
        merged[index] = single.merge_and_unload()(kjt)
    if kind == "ec":
        for key in kjt.keys():
            sample_of_id = torch.arange(10).repeat_interleave(kjt[key].lengths())
            expected = (
                torch.stack([merged[int(ids[j])][key].values()[k] for k, j in enumerate(sample_of_id)])
                if sample_of_id.numel()
                else routed[key].values()
            )
            assert_within_bound(routed[key].values(), expected, bound[key].values(), COLLECTION_ROUNDINGS, name=key)
    else:
        expected = torch.stack([merged[int(a)].values()[j] for j, a in enumerate(ids)])
        assert_within_bound(routed.values(), expected, bound.values(), COLLECTION_ROUNDINGS, name="routed")
        with pytest.raises(AssertionError, match="out of bound"):  # each row through the other adapter
            wrong = torch.stack([merged[1 - int(a) if a >= 0 else 0].values()[j] for j, a in enumerate(ids)])
            assert_within_bound(routed.values(), wrong, bound.values(), COLLECTION_ROUNDINGS)
