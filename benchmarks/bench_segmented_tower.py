"""Many adapters in one batch on the CPU, the issue-16 shape: an MLP tower (K = N = 512, 3 layers)
over an embedding bag (V = 1,000,000, D = 64, 20 ids per bag) plus 512 dense features, r = 16,
batch B = 8192, 64 adapters (init_lora_weights=False: every adapter non-zero and different), each
sample's adapter uniform in [0, 64); fp32.

    merged              (a) inference, one adapter merged into the weights: the plain model (the floor)
    routed              (b) inference, ``model(x, ids, adapter_ids=a)`` through the 64 adapters:
                            every layer gathers its rows by adapter and scatters its deltas back
    routed_grouped      (b') the same with ``group_by_adapter=True``: the batch is sorted by
                            adapter once, every layer works on slices, the output is put back
    train_one           (c) a training step (forward, BCE, backward, LoraAdamW) of one adapter
    train_mixed         (d) the same step with the batch routed to all 64 adapters at once
    train_mixed_grouped (d') (d) with ``group_by_adapter=True``

Before anything is timed, for two samples of every adapter the routed output equals the output
of the model with that adapter merged (float64 merge of W + s·B·A and E + s·A·B on the rows).

Targets (issue 16, reported, not asserted): routed / merged ≤ 1.2x; train_mixed / train_one ≤ 1.5x
(both judged on the better of the plain and the grouped call).
Run with ``make bench`` (or ``pytest benchmarks/bench_segmented_tower.py -s -o
'python_files=bench_*.py'``); writes ``benchmarks/results/cpu_segmented_tower.json``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recpeft import LoraAdamW, LoraConfig, get_peft_model

B, K, V, D, IDS, R, ALPHA = 8192, 512, 1_000_000, 64, 20, 16, 32
NUM_ADAPTERS = 64
ROUNDS = 5
INTERLEAVED_ROUNDS = 5
TARGETS = ["tower.0", "tower.2", "tower.4", "bag"]

SUITE = {
    "name": "segmented_tower",
    "title": f"{NUM_ADAPTERS} adapters in one batch: 3×{K} MLP tower + bag V={V:,} D={D}, {IDS} ids/bag, r={R}, B={B}",
    "shape": {"B": B, "K": K, "V": V, "D": D, "ids_per_bag": IDS, "r": R, "num_adapters": NUM_ADAPTERS},
    "dtype": "float32",
    "floor": "merged",
    "targets": {"routed": 1.2, "routed_grouped": 1.2},
    "anchors": {"train_mixed / train_one target": "1.5x"},
}
VARIANTS = ["merged", "routed", "routed_grouped", "train_one", "train_mixed", "train_mixed_grouped"]


class Tower(nn.Module):
    """logit = tower([bag(ids), x])."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode="sum")
        self.tower = nn.Sequential(
            nn.Linear(K + D, K), nn.ReLU(), nn.Linear(K, K), nn.ReLU(), nn.Linear(K, K), nn.ReLU(), nn.Linear(K, 1)
        )

    def forward(self, x, ids):
        return self.tower(torch.cat([x, self.bag(ids)], dim=1)).squeeze(1)


@pytest.fixture(scope="module")
def case(bench):
    torch.manual_seed(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    names = [f"seg{i:02d}" for i in range(NUM_ADAPTERS)]
    peft = get_peft_model(Tower(), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, K, generator=g)
    ids = torch.randint(0, V, (B, IDS), generator=g)
    adapter_ids = torch.randint(0, NUM_ADAPTERS, (B,), generator=g)
    labels = (torch.rand(B, generator=g) < 0.3).float()
    merged = get_peft_model(Tower(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)).eval()
    merged.load_state_dict(peft.state_dict(), strict=False)  # the same base weights
    with torch.no_grad():
        for layer_name, layer in peft.lora_layers().items():
            twin = merged.lora_layers()[layer_name]
            twin.lora_A["default"].copy_(layer.lora_A[names[0]])
            twin.lora_B["default"].copy_(layer.lora_B[names[0]])
    merged = merged.merge_and_unload().eval()
    optimizer = LoraAdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

    def step(routing, grouped=False):
        peft.train()
        kwargs = {"adapter_ids": routing, "group_by_adapter": grouped} if routing is not None else {}
        loss = F.binary_cross_entropy_with_logits(peft(x, ids, **kwargs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    def train_one():
        peft.set_adapter(names[0])
        step(None)

    variants = {
        "merged": bench.Variant("(a) one adapter merged: the plain model (floor)", no_grad(lambda: merged(x, ids))),
        "routed": bench.Variant(
            "(b) recpeft, 64 adapters routed per sample", no_grad(lambda: peft.eval()(x, ids, adapter_ids=adapter_ids))
        ),
        "routed_grouped": bench.Variant(
            "(b') the same, group_by_adapter=True",
            no_grad(lambda: peft.eval()(x, ids, adapter_ids=adapter_ids, group_by_adapter=True)),
        ),
        "train_one": bench.Variant("(c) training step, one adapter", train_one),
        "train_mixed": bench.Variant("(d) training step, 64 adapters routed", lambda: step(adapter_ids)),
        "train_mixed_grouped": bench.Variant(
            "(d') the same, group_by_adapter=True", lambda: step(adapter_ids, grouped=True)
        ),
    }
    # ---- the routed output is each sample's merged model, checked before anything is timed ----
    with torch.no_grad():
        peft.eval()
        routed = peft(x, ids, adapter_ids=adapter_ids)
        bench.assert_close("adapter 0 merged vs routed rows of adapter 0", merged(x, ids)[adapter_ids == 0],
                           routed[adapter_ids == 0])  # fmt: skip
        for a in range(1, NUM_ADAPTERS):
            rows = (adapter_ids == a).nonzero().squeeze(1)[:2]
            peft.set_adapter(names[a])
            alone = peft(x[rows], ids[rows])
            bench.assert_close(f"adapter {a}: routed vs alone", routed[rows], alone)
        grouped = peft(x, ids, adapter_ids=adapter_ids, group_by_adapter=True)
        bench.assert_close("group_by_adapter=True vs plain routing", routed, grouped)
        delta = (routed - merged(x, ids)).abs().max().item()
        assert delta > 1e-3, f"the adapters barely differ ({delta:.2e})"
    return variants


def test_variants_agree(case):
    assert set(case) == set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_segmented_tower(benchmark, report, case, name):
    report.time(benchmark, name, case[name], rounds=ROUNDS, warmup_rounds=1)


def test_segmented_tower_interleaved(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    report.time_interleaved(case, rounds=INTERLEAVED_ROUNDS)
    times = report.interleaved
    routed = min(times["routed"], times["routed_grouped"])
    mixed = min(times["train_mixed"], times["train_mixed_grouped"])
    report.extra["train_mixed_over_train_one"] = round(times["train_mixed"] / times["train_one"], 3)
    report.extra["train_mixed_grouped_over_train_one"] = round(times["train_mixed_grouped"] / times["train_one"], 3)
    report.extra["targets_met"] = {
        "routed / merged <= 1.2": routed / times["merged"] <= 1.2,
        "train_mixed / train_one <= 1.5": mixed / times["train_one"] <= 1.5,
    }
