"""The reference models: forwards against independent float64 / torchrec computations, and each
model through get_peft_model (identity at init, training touches adapters only, save → load,
merge), SASRec's causality, and learning on toy tasks."""

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recpeft import LoraAdamW, LoraConfig, PeftModel, get_peft_model
from recpeft.models import SASRec, TwoTower
from recpeft.models.dlrm import build_click_model, single_id_kjt

from reference_math import abs_twin, assert_bound_can_fail, assert_normwise_close, assert_within_bound

torch.set_num_threads(1)

CARDS = {"user": 60, "item": 40, "cat": 7}


# --------------------------------------------------------------------------- one case per model


@dataclass
class Case:
    build: Callable[[], nn.Module]  # a fresh base model, same weights every call
    batch: Callable[[int], tuple]  # seed → (args, kwargs, target)
    loss: Callable[[nn.Module, tuple], torch.Tensor]


def _seeded(factory):
    def build():
        torch.manual_seed(7)
        return factory()

    return build


def _dlrm_batch(seed, size=24):
    g = torch.Generator().manual_seed(seed)
    ids = {f: torch.randint(0, rows, (size,), generator=g) for f, rows in CARDS.items()}
    return (torch.randn(size, 3, generator=g), single_id_kjt(ids)), {}, (torch.rand(size, generator=g) < 0.4).float()


def _two_tower_batch(seed, size=24):
    g = torch.Generator().manual_seed(seed)
    args = (torch.randint(0, 50, (size,), generator=g), torch.randint(0, 40, (size,), generator=g))
    kwargs = {
        "user_feats": {"age": torch.randint(0, 5, (size,), generator=g)},
        "item_feats": {"cat": torch.randint(0, 6, (size,), generator=g)},
    }
    return args, kwargs, (torch.rand(size, generator=g) < 0.4).float()


def _sasrec_batch(seed, size=12):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 30, (size, 9), generator=g)
    seq[:3, :4] = 0  # some left padding
    return (seq[:, :-1],), {}, seq[:, 1:].masked_fill(seq[:, :-1] == 0, 0)


def _bce(model, batch):
    args, kwargs, labels = batch
    return F.binary_cross_entropy_with_logits(model(*args, **kwargs), labels)


def _next_item(model, batch):
    (seq,), _, targets = batch
    return model.loss(seq, targets)


CASES = {
    "dlrm": Case(
        _seeded(
            lambda: build_click_model(CARDS, 3, kind="dlrm", embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 8))
        ),
        _dlrm_batch,
        _bce,
    ),
    "dcn": Case(
        _seeded(
            lambda: build_click_model(
                CARDS, 3, kind="dcn", embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 8), dcn_rank=4
            )
        ),
        _dlrm_batch,
        _bce,
    ),
    "two_tower": Case(
        _seeded(lambda: TwoTower(50, 40, user_features={"age": 5}, item_features={"cat": 6}, dim=8, hidden=(16,))),
        _two_tower_batch,
        _bce,
    ),
    "sasrec": Case(
        _seeded(lambda: SASRec(30, 8, dim=16, num_blocks=2, num_heads=2, dropout=0.0)), _sasrec_batch, _next_item
    ),
}


def _outputs(model, batch):
    args, kwargs, _ = batch
    model.eval()
    with torch.no_grad():
        return model(*args, **kwargs)


# --------------------------------------------------------------------------- through get_peft_model


@pytest.mark.parametrize("kind", list(CASES))
def test_lora_on_default_targets_trains_saves_loads_merges(kind, tmp_path):
    case = CASES[kind]
    base = case.build()
    batch, probe = case.batch(1), case.batch(2)
    expected = _outputs(base, probe)
    targets = base.lora_targets()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    adapted_names = set()  # a torchrec collection is one layer whose tables are "<collection>.<table>"
    for name, layer in model.lora_layers().items():
        tables = layer.tables("default") if hasattr(layer, "tables") else None
        adapted_names |= {f"{name}.{t}" for t in tables} if tables is not None else {name}
    assert adapted_names == set(targets)
    assert model.lora_targets() == targets  # the same names once wrapped
    assert torch.equal(_outputs(model, probe), expected)  # B = 0 / A = 0 at init: the base's own ops, bit for bit

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = LoraAdamW(list(model.parameters()), lr=0.02, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(6):
        loss = case.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    adapted = _outputs(model, probe)
    with pytest.raises(AssertionError, match="exceeds"):  # training moved the outputs beyond any rounding
        assert_normwise_close(adapted, expected)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert torch.equal(_outputs(loaded, probe), adapted)  # the saved tensors, the same ops: bit for bit
    merged = loaded.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # merged vs unmerged sums in another order; layer norm, softmax and the DCN's cross layers make
    # the componentwise bound vacuous here (tests/layers hold the per-layer bounds)
    assert_normwise_close(_outputs(merged, probe), adapted, name="merged")


@pytest.mark.parametrize("kind", ["dcn", "two_tower", "sasrec"])
def test_routing_a_mixed_batch_equals_each_adapter_alone(kind):
    case = CASES[kind]
    base = case.build()
    targets = base.lora_targets()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    probe = case.batch(9)
    size = len(probe[2])
    ids = torch.randint(-1, 2, (size,))
    model.eval()
    args, kwargs, _ = probe
    with torch.no_grad():
        routed = model(*args, adapter_ids=ids, **kwargs)
        alone = {}
        for index, name in enumerate(model.adapter_names):
            model.set_adapter(name)
            alone[index] = model(*args, **kwargs)
        with model.disable_adapter():
            alone[-1] = model(*args, **kwargs)
    with pytest.raises(AssertionError, match="exceeds"):  # the adapter changes the output beyond rounding
        assert_normwise_close(alone[0], alone[-1])
    expected = torch.stack([alone[int(a)][i] for i, a in enumerate(ids)])
    assert_normwise_close(routed, expected, name="routed")  # layer norm, softmax, cross layers: see above
    with pytest.raises(AssertionError, match="exceeds"):
        assert_normwise_close(routed, torch.stack([alone[(int(a) + 2) % 3 - 1][i] for i, a in enumerate(ids)]))


@pytest.mark.parametrize("kind", list(CASES))
def test_full_training_learns_a_toy_task(kind):
    """Dense training on a fixed batch whose labels follow a learnable rule: the loss falls."""
    case = CASES[kind]
    model = case.build()
    args, kwargs, target = case.batch(3, 48) if kind != "sasrec" else case.batch(3)
    if kind != "sasrec":  # click iff the item id is even — a function of the item table alone
        item = args[1].to_dict()["item"].values() if kind in ("dlrm", "dcn") else args[1]
        target = (item % 2 == 0).float()
    else:  # next item = current item + 1 (mod 29, ids 1..29)
        seq = args[0]
        target = torch.where(seq == 0, 0, seq % 29 + 1)
    batch = (args, kwargs, target)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    first = case.loss(model, batch).item()
    for _ in range(40):
        loss = case.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert case.loss(model, batch).item() < 0.5 * first


# --------------------------------------------------------------------------- DLRM


@pytest.mark.parametrize("kind", ["dlrm", "dcn"])
def test_click_dlrm_equals_torchrec_and_rebuilds_from_its_spec(kind):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM, DLRM_DCN

    model = CASES[kind].build()
    args, _, _ = _dlrm_batch(4)
    out = _outputs(model, (args, {}, None))
    assert out.shape == (24,)
    # torchrec's own model, built independently, with the same weights: the same logits
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=n, feature_names=[f])
        for f, n in CARDS.items()
    ]
    common = dict(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=3,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 8, 1],
    )
    reference = DLRM(**common) if kind == "dlrm" else DLRM_DCN(**common, dcn_num_layers=2, dcn_low_rank_dim=4)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, reference(*args).squeeze(1).detach(), rtol=0, atol=0)
    # the JSON spec rebuilds the architecture
    rebuilt = build_click_model(**json.loads(json.dumps(model.spec)))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(_outputs(rebuilt, (args, {}, None)), out, rtol=0, atol=0)
    table = model.sparse_arch.embedding_bag_collection.embedding_bags["t_user"].weight
    assert 0.03 < float(table.detach().std()) < 0.07  # init_std = 0.05
    assert model.lora_targets()[-1] == "over_arch.model.1"


def test_click_dlrm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dense_arch"):
        build_click_model(CARDS, 3, embedding_dim=8, dense_arch=(16, 4))
    with pytest.raises(ValueError, match="kind"):
        build_click_model(CARDS, 3, kind="dcnv2")
    with pytest.raises(ValueError, match=r"cardinalities\['cat'\]"):
        build_click_model({"user": 5, "cat": 0}, 3)
    model = CASES["dlrm"].build()
    dense, _ = _dlrm_batch(5)[0]
    with pytest.raises(ValueError, match=r"\['cat'\]"):
        model(dense, single_id_kjt({"user": torch.tensor([1] * 24), "item": torch.tensor([2] * 24)}))
    with pytest.raises(ValueError, match="dense must be"):
        model(dense[:, :2], _dlrm_batch(5)[0][1])


# --------------------------------------------------------------------------- two-tower


def test_two_tower_against_a_float64_formula():
    model = CASES["two_tower"].build().double().eval()
    (user, item), kwargs, _ = _two_tower_batch(6)

    def tower(t, ids, feats):  # [id, features] → Linear → ReLU → Linear, by hand
        x = torch.cat([t.tables["id"].weight[ids]] + [t.tables[k].weight[v] for k, v in feats.items()], dim=1)
        hidden = torch.relu(x @ t.mlp[0].weight.t() + t.mlp[0].bias)
        return hidden @ t.mlp[3].weight.t() + t.mlp[3].bias

    u = tower(model.user_tower, user, kwargs["user_feats"])
    v = tower(model.item_tower, item, kwargs["item_feats"])
    twin = abs_twin(model)  # the bound: the same on absolute values (reference_math.assert_within_bound)
    mlp = model.user_tower.mlp
    # each tower: two layers (inputs + bias); the dot product adds both towers' counts and its length
    n = 2 * (mlp[0].in_features + mlp[3].in_features + 2) + mlp[3].out_features + 1
    with torch.no_grad():
        bound = twin(user, item, **kwargs)
        assert_within_bound(model(user, item, **kwargs), (u * v).sum(1), bound, n, torch.float64, name="score")
        assert_bound_can_fail((u * v).sum(1), bound, n, torch.float64)
        all_cats = torch.randint(0, 6, (40,))
        scores = model.score_all(user, kwargs["user_feats"], {"cat": all_cats})
        bounds = twin.score_all(user, kwargs["user_feats"], {"cat": all_cats})
        assert scores.shape == (24, 40)
        for b, i in [(0, 0), (5, 17), (23, 39)]:
            one = model(
                user[b : b + 1],
                torch.tensor([i]),
                {"age": kwargs["user_feats"]["age"][b : b + 1]},
                {"cat": all_cats[i : i + 1]},
            )
            assert_within_bound(one[0], scores[b, i], bounds[b, i], n, torch.float64, name="score_all")
    with pytest.raises(ValueError, match="cat"):
        model.item_embeddings()  # the item tower needs every item's category


def test_in_batch_softmax_loss_against_a_loop():
    u, v = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    ids = torch.tensor([3, 1, 3, 4, 5, 1])
    for item_ids in (None, ids):
        total = 0.0
        for b in range(6):
            others = [j for j in range(6) if item_ids is None or j == b or item_ids[j] != item_ids[b]]
            logits = [float(u[b] @ v[j]) / 0.5 for j in others]
            total -= logits[others.index(b)] - math.log(sum(math.exp(x) for x in logits))
        got = TwoTower.in_batch_softmax_loss(u, v, temperature=0.5, item_ids=item_ids)
        assert got.item() == pytest.approx(total / 6, rel=1e-12)


# --------------------------------------------------------------------------- SASRec


def _sasrec_reference(model, seq):
    """The forward written out in float64 with an explicit masked softmax per head."""
    m = copy.deepcopy(model).double().eval()
    B, L = seq.shape
    D, H = m.spec["dim"], m.spec["num_heads"]
    keep = (seq != 0).double().unsqueeze(-1)
    x = (m.item_emb.weight[seq] * math.sqrt(D) + m.pos_emb.weight[:L]) * keep
    for blk in m.blocks:
        h = F.layer_norm(x, (D,), blk.attn_norm.weight, blk.attn_norm.bias)
        q, k, v = (lin(h).view(B, L, H, D // H) for lin in (blk.attn.q, blk.attn.k, blk.attn.v))
        out = torch.zeros_like(h)
        for b in range(B):
            for t in range(L):
                seen = [s for s in range(t + 1) if seq[b, s] != 0 or s == t]
                for head in range(H):
                    w = torch.softmax(torch.stack([q[b, t, head] @ k[b, s, head] for s in seen]) / math.sqrt(D // H), 0)
                    out[b, t, head * (D // H) : (head + 1) * (D // H)] = sum(
                        wi * v[b, s, head] for wi, s in zip(w, seen)
                    )
        x = x + blk.attn.out(out)
        h = F.layer_norm(x, (D,), blk.ffn_norm.weight, blk.ffn_norm.bias)
        x = (x + blk.ffn_out(torch.relu(blk.ffn_in(h)))) * keep
    return F.layer_norm(x, (D,), m.final_norm.weight, m.final_norm.bias), m.item_emb.weight


def test_sasrec_against_a_float64_reference_and_causal():
    model = CASES["sasrec"].build().eval()
    (seq,), _, targets = _sasrec_batch(8, size=4)
    with torch.no_grad():
        hidden = model(seq)
        assert hidden.shape == (4, 8, 16)
        expected, table = _sasrec_reference(model, seq)
        item_rows = seq != 0
        torch.testing.assert_close(hidden[item_rows].double(), expected[item_rows], rtol=1e-4, atol=1e-4)
        scores = model.score_all(seq)
        assert scores.shape == (4, 30)
        torch.testing.assert_close(scores[:, 1:].double(), expected[:, -1] @ table[1:].t(), rtol=1e-4, atol=1e-4)
        assert (scores[:, 0] < scores[:, 1:].min(1).values).all()  # padding is never recommended
        logits = (expected @ table.t())[..., 1:]
        mask = targets != 0
        reference_loss = F.cross_entropy(logits[mask], targets[mask] - 1)
        assert model.loss(seq, targets).item() == pytest.approx(reference_loss.item(), rel=1e-4)
        # causality: changing the item at position 5 leaves positions 0..4 unchanged, changes 5..7
        changed = seq.clone()
        changed[:, 5] = changed[:, 5] % 29 + 1
        again = model(changed)
        assert torch.equal(again[:, :5], hidden[:, :5])  # masked positions weigh exactly 0: bit for bit
        assert not torch.allclose(again[:, 5:], hidden[:, 5:], atol=1e-4)


def test_sasrec_rejects_bad_sequences():
    model = CASES["sasrec"].build()
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        model(torch.tensor([[1, 30]]))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model.loss(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
