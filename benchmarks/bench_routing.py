"""Routed inference, 64 adapters in one batch, fp32 CPU: recpeft's per-sample routing against one
merged layer and HF-PEFT-style mixed batches.

Shape M=8192 samples, K=N=512, r=16, α=32 (s = 2), 64 adapters (init_lora_weights=False, so every
adapter is non-zero and different), each sample's adapter drawn uniformly from [0, 64).
Everything runs under ``torch.no_grad()``.

    merged    (a) one merged layer: a plain nn.Linear forward — the floor
    recpeft   (b) get_peft_model + 63 × add_adapter, ``model(x, adapter_ids=ids)``
    grouped   (b') the same batch with its samples grouped by adapter (as a serving batcher that
                  groups requests by segment sends it): the layer updates contiguous slices
    masks     (c) HF-PEFT-style mixed batch: base(x), then a Python loop over the 64 adapters,
                  each selecting its sub-batch with a boolean mask: y[m] += B(A(x[m]))·s
    hf_lists  (d) HF PEFT's own ``_mixed_batch_forward`` recipe: per-sample adapter *names*, one
                  Python list of row indices per adapter built by enumerating the batch, then
                  the same loop with list indexing

Before anything is timed: all routed variants agree, and for a few samples of every adapter the
routed output equals x·(W + s·B·A)ᵀ + b computed in float64 — the sample run through its own
merged model.

Target (reported, not asserted): recpeft/merged ≤ 1.5x. DESIGN.md anchor: HF PEFT mixed batch
3.4x one merged layer on this machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recpeft import LoraConfig, get_peft_model

M, K, N, R, ALPHA = 8192, 512, 512, 16, 32
NUM_ADAPTERS = 64
SAMPLES_PER_ADAPTER_CHECKED = 2
ROUNDS = 20
INTERLEAVED_ROUNDS = 15

SUITE = {
    "name": "routing",
    "title": f"Routed inference, {NUM_ADAPTERS} adapters, fp32, M={M} K={K} N={N} r={R}",
    "shape": {
        "M": M,
        "K": K,
        "N": N,
        "r": R,
        "lora_alpha": ALPHA,
        "num_adapters": NUM_ADAPTERS,
        "adapter_ids": "uniform random in [0, 64) per sample",
    },
    "dtype": "float32",
    "floor": "merged",
    "targets": {"recpeft": 1.5, "grouped": 1.5},
    "anchors": {"HF PEFT mixed batch / one merged layer (DESIGN.md, 2 CPU cores)": "3.4x"},
}
VARIANTS = ["merged", "recpeft", "grouped", "masks", "hf_lists"]


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.fc = layer

    def forward(self, x):
        return self.fc(x)


@pytest.fixture(scope="module")
def case(bench):
    torch.manual_seed(0)
    scale = ALPHA / R
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc"], init_lora_weights=False)
    names = [f"seg{i:02d}" for i in range(NUM_ADAPTERS)]
    peft = get_peft_model(OneLayer(nn.Linear(K, N)), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    peft.eval()
    assert list(peft.adapter_names) == names
    layer = peft.base_model.fc
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    lora_A = [layer.lora_A[n].detach() for n in names]  # [r, K] each
    lora_B = [layer.lora_B[n].detach() for n in names]  # [N, r] each
    assert all(peft.peft_config[n].scale_for("fc") == scale for n in names)

    x = torch.randn(M, K)
    ids = torch.randint(0, NUM_ADAPTERS, (M,))

    def merged():
        return F.linear(x, weight, bias)

    def routed():
        return peft(x, adapter_ids=ids)

    order = torch.argsort(ids)
    x_grouped, ids_grouped = x[order].contiguous(), ids[order]

    def routed_grouped():
        return peft(x_grouped, adapter_ids=ids_grouped)

    def masks():
        y = F.linear(x, weight, bias)
        for a in range(NUM_ADAPTERS):
            rows = ids == a
            sub = x[rows]
            y[rows] += F.linear(F.linear(sub, lora_A[a]), lora_B[a]) * scale
        return y

    def hf_lists():
        # peft.tuners.lora.layer.LoraLayer._mixed_batch_forward, with nn.Linear A and B as F.linear
        adapter_names = [names[i] for i in ids.tolist()]
        y = F.linear(x, weight, bias)
        unique_adapters = set(adapter_names)
        sub_batch_indices_list = [
            [index for index, item in enumerate(adapter_names) if item == adapter] for adapter in unique_adapters
        ]
        for i, adapter in enumerate(unique_adapters):
            a = names.index(adapter)
            sub_batch = x[sub_batch_indices_list[i]]
            y[sub_batch_indices_list[i]] += F.linear(F.linear(sub_batch, lora_A[a]), lora_B[a]) * scale
        return y

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    variants = {
        "merged": bench.Variant("(a) one merged nn.Linear (floor)", no_grad(merged)),
        "recpeft": bench.Variant("(b) recpeft model(x, adapter_ids=ids)", no_grad(routed)),
        "grouped": bench.Variant("(b') recpeft, batch grouped by adapter", no_grad(routed_grouped)),
        "masks": bench.Variant("(c) loop over adapters, boolean masks", no_grad(masks)),
        "hf_lists": bench.Variant("(d) HF PEFT _mixed_batch_forward (index lists)", no_grad(hf_lists)),
    }

    # ---- the variants compute the same thing, checked before anything is timed ----
    outputs = {name: variants[name].run() for name in ("recpeft", "masks", "hf_lists")}
    bench.assert_close("recpeft vs boolean-mask loop", outputs["recpeft"], outputs["masks"])
    bench.assert_close("recpeft vs HF index lists", outputs["recpeft"], outputs["hf_lists"])
    bench.assert_close(
        "grouped batch vs the same samples in random order", variants["grouped"].run(), outputs["recpeft"][order]
    )
    checked = torch.cat([(ids == a).nonzero().squeeze(1)[:SAMPLES_PER_ADAPTER_CHECKED] for a in range(NUM_ADAPTERS)])
    for sample in checked.tolist():
        a = int(ids[sample])
        merged_weight = weight.double() + scale * lora_B[a].double() @ lora_A[a].double()  # W + s·B·A
        expected = x[sample].double() @ merged_weight.t() + bias.double()
        bench.assert_close(
            f"sample {sample} (adapter {names[a]}) vs its merged model", outputs["recpeft"][sample], expected
        )
    assert checked.numel() >= NUM_ADAPTERS, "some adapter got no samples"
    delta = (outputs["recpeft"] - variants["merged"].run()).abs().max().item()
    assert delta > 0.1, f"the adapters barely change the output ({delta:.2e})"
    return variants


def test_variants_agree(case):
    """The check itself runs in the ``case`` fixture, before any timing."""
    assert set(case) == set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_routing(benchmark, report, case, name):
    report.time(benchmark, name, case[name], rounds=ROUNDS)


def test_routing_interleaved(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    report.time_interleaved(case, rounds=INTERLEAVED_ROUNDS)
