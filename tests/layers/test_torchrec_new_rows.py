"""New-id rows on torchrec collections' tables (recpeft.layers.torchrec.collection_new_rows).

Every pooled feature f of a table t with n new rows must be Σ w·E_t[base(i)] + s·(Σ w·A_t[i])·B_t
with base(i) = k (the new-id row) for V ≤ i < V + n: checked against that formula in float64 on
random tables and bags (sum and mean pooling, a table with two features), unrouted and routed
(each sample its own adapter's limit), and through merging (the table grows, unmerging shrinks
it) and save/load of a DLRM adapter keyed ``"<collection>.<table>"``."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers.routing import routed
from recpeft.layers.torchrec import LoraEmbeddingBagCollection

from reference_math import assert_within_bound
from torchrec_models import make_batch, make_dlrm

D, R, SCALE = 6, 3, 1.5
TABLES = {"t_user": (40, ["user"], PoolingType.SUM), "t_cat": (30, ["cat", "cat2"], PoolingType.MEAN)}
NEW = {"t_user": 5, "t_cat": 3}
MAX_LEN = 4
# float32 roundings per output entry: a bag of ≤ 4 terms of E (+ a mean's division), the rank-R
# pooled A likewise, its R-term product with B, the scale and the final sum
ROUNDINGS = (MAX_LEN + 1) + (MAX_LEN + 1) + R + 2


def _layer(seed=0, adapters=(("de", NEW),)):
    torch.manual_seed(seed)
    configs = [
        EmbeddingBagConfig(name=t, embedding_dim=D, num_embeddings=v, feature_names=fs, pooling=p)
        for t, (v, fs, p) in TABLES.items()
    ]
    layer = LoraEmbeddingBagCollection(EmbeddingBagCollection(configs), "ebc")
    g = torch.Generator().manual_seed(50 + seed)
    for adapter, new in adapters:
        layer.update_parts(adapter, {t: (R, SCALE) for t in TABLES}, init=True)
        for table, count in new.items():
            layer.add_table_new_rows(adapter, table, count, new_id_row=-1)
        with torch.no_grad():
            for table in TABLES:
                a = layer.adapter_table(adapter, table)
                a.copy_(torch.randn(a.shape, generator=g))
                layer.lora_B[adapter][table].normal_(generator=g)
    return layer


def _features(seed, limits, batch=7):
    """A KJT over every feature, ids in [0, limits[table]) (so past V where new rows are given)."""
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for table, (_, features, _) in TABLES.items():
        for feature in features:
            n = torch.randint(1, MAX_LEN + 1, (batch,), generator=g)
            keys.append(feature)
            lengths.append(n)
            values.append(torch.randint(0, limits[table], (int(n.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def _expected64(layer, features, adapter_of_sample):
    """{feature: (float64 [B, D] output, its abs bound)} by the formula, sample j through adapter
    ``adapter_of_sample[j]`` (None: the base alone)."""
    out = {}
    per_key = features.to_dict()
    for table, (rows, names, pooling) in TABLES.items():
        e = layer.base_table(table).detach().double()
        for feature in names:
            jt = per_key[feature]
            got, bound = [], []
            for j, ids in enumerate(jt.values().split(jt.lengths().tolist())):
                adapter = adapter_of_sample[j]
                base_rows = e[torch.where(ids >= rows, torch.full_like(ids, rows - 1), ids)]
                value, size = base_rows.sum(0), base_rows.abs().sum(0)
                if adapter is not None:
                    a = layer.adapter_table(adapter, table).detach().double()[ids]
                    b = layer.lora_B[adapter][table].detach().double()
                    value = value + SCALE * a.sum(0) @ b
                    size = size + SCALE * a.abs().sum(0) @ b.abs()
                divide = len(ids) if pooling == PoolingType.MEAN else 1
                got.append(value / divide)
                bound.append(size / divide)
            out[feature] = (torch.stack(got), torch.stack(bound))
    return out


def _check(layer, features, adapter_of_sample, output):
    for feature, (expected, bound) in _expected64(layer, features, adapter_of_sample).items():
        assert_within_bound(output[feature].double(), expected, bound, ROUNDINGS, name=feature)


def test_new_ids_look_up_the_new_id_row_plus_their_own_offset():
    layer = _layer()
    layer.active_adapters = ["de"]
    limits = {t: TABLES[t][0] + NEW[t] for t in TABLES}
    features = _features(1, limits)
    assert int(features.values().max()) >= min(TABLES[t][0] for t in TABLES)  # new ids are looked up
    with torch.no_grad():
        output = layer(features).to_dict()
    _check(layer, features, ["de"] * features.stride(), output)
    assert layer.adapter_table("de", "t_user").shape == (40 + 5, R)


def test_ids_past_the_adapters_rows_are_refused_naming_the_table():
    layer = _layer()
    layer.active_adapters = ["de"]
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "cat", "cat2"], values=torch.tensor([45, 1, 2]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(IndexError, match=r"ebc\.t_user \(feature 'user'\): id 45 .* past the 45 rows of adapter 'de'"):
        layer(features)


def test_routed_samples_use_their_own_adapters_new_rows():
    layer = _layer(adapters=(("de", NEW), ("fr", {"t_user": 2})))
    names = ("de", "fr")
    features = _features(3, {"t_user": 42, "t_cat": 30}, batch=6)  # within fr's 2 new user rows
    ids = torch.tensor([0, 1, -1, 1, 0, 1])
    with torch.no_grad(), routed(ids, names):
        output = layer(features).to_dict()
    _check(layer, features, ["de", "fr", None, "fr", "de", "fr"], output)
    past = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "cat", "cat2"],
        values=torch.tensor([43, 43, 1, 1, 2, 2]),
        lengths=torch.ones(6, dtype=torch.int64),
    )
    with torch.no_grad(), routed(torch.tensor([0, 1]), names):  # id 43: de's, past fr's 42 rows
        with pytest.raises(IndexError, match=r"id 43 at position 1 is past the 42 rows of adapter 'fr'"):
            layer(past)


def test_merging_grows_the_table_and_unmerging_shrinks_it():
    layer = _layer()
    layer.active_adapters = ["de"]
    features = _features(4, {t: TABLES[t][0] + NEW[t] for t in TABLES})
    before = layer.base_table("t_user").detach().clone()
    with torch.no_grad():
        unmerged = layer(features).values()
        layer.merge(["de"])
        assert layer.base_table("t_user").shape == (45, D)
        assert layer.embedding_bag_configs()[0].num_embeddings == 45
        merged = layer(features).values()
        layer.unmerge(["de"])
    assert layer.base_table("t_user").shape == (40, D) and layer.embedding_bag_configs()[0].num_embeddings == 40
    restored = layer.base_table("t_user").detach()
    assert_within_bound(restored, before, before.abs() + 1.0, 2 * (R + 2), name="restored")
    # merged rows E[i] + s·A[i]·B hold the same terms as the unmerged sum, rounded once more each
    assert_within_bound(merged, unmerged, unmerged.abs() + 10.0, 2 * ROUNDINGS, name="merged")
    layer.update_parts("fr", {"t_user": (R, SCALE)}, init=True)
    layer.add_table_new_rows("fr", "t_user", 2)
    with pytest.raises(ValueError, match=r"ebc\.t_user: adapters \['de', 'fr'\] all have new-id rows"):
        layer.merge(["de"])


def test_a_dlrm_adapter_with_table_new_rows_saves_loads_and_refuses_an_untargeted_key(tmp_path):
    config = LoraConfig(
        r=R,
        lora_alpha=R * SCALE,
        target_modules=["sparse_arch.embedding_bag_collection"],
        new_rows={"sparse_arch.embedding_bag_collection.t_user": 4},
    )
    model = get_peft_model(make_dlrm("dlrm"), config)
    layer = model.lora_layers()["sparse_arch.embedding_bag_collection"]
    with torch.no_grad():
        a = layer.adapter_table("default", "t_user")
        a.copy_(torch.randn(a.shape, generator=torch.Generator().manual_seed(9)))
    dense, sparse, _ = make_batch(8, seed=2)
    values = sparse.values().clone()
    values[: sparse.length_per_key()[0]] = 400 + torch.arange(sparse.length_per_key()[0]) % 4  # new user ids
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=values, lengths=sparse.lengths())
    with torch.no_grad():
        out = model(dense, sparse)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_dlrm("dlrm"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(dense, sparse), out)
    assert (
        loaded.lora_layers()["sparse_arch.embedding_bag_collection"].adapter_table("default", "t_user").shape[0] == 404
    )
    bad = LoraConfig(r=R, target_modules=["sparse_arch.embedding_bag_collection"], new_rows={"over_arch.t_user": 2})
    with pytest.raises(ValueError, match=r"new_rows names \['over_arch.t_user'\], not among the adapter's targets"):
        get_peft_model(make_dlrm("dlrm"), bad)
