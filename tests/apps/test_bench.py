"""recpeft.apps.bench: LoRA against dense fine-tuning, samples/s and peak memory in fresh processes."""

import copy
import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.apps import bench
from recpeft.apps.base_checkpoint import save_base
from recpeft.apps.bench import (
    TARGETS,
    VARIANTS,
    BenchSpec,
    build_base,
    draw_batches,
    memory_probe,
    model_options,
    power_law_ids,
    prepare_variant,
    print_bench,
    run_bench,
    train_step,
)
from recpeft.apps.shop_recipe import LORA
from recpeft.datasets import FeatureEncoder
from recpeft.datasets.synthetic import SHOP_SCHEMA
from recpeft.models.dlrm import build_click_model
from recpeft.train.lora_adamw import LoraAdamW
from recpeft.utils.devices import describe_device, resolve_device
from recpeft.utils.memory_probe import can_measure_memory

BIG_USER_ROWS, DIM = 200_000, 64
needs_proc = pytest.mark.skipif(not can_measure_memory(), reason="needs Linux /proc/self/clear_refs")


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_bench(
            rows_per_table={"user": BIG_USER_ROWS, "item": 3000}, batch_size=256, steps=1, rounds=2, progress=False
        )
    finally:
        torch.set_num_threads(threads)


def _table_bytes(cardinalities: dict, dim: int) -> int:
    return sum(cardinalities.values()) * dim * 4  # fp32


@needs_proc
def test_result_is_json_and_consistent(result, capsys):
    assert json.loads(json.dumps(result)) == result
    assert set(result["variants"]) == set(VARIANTS)
    assert result["model"]["cardinalities"] == {
        "user": BIG_USER_ROWS,
        "item": 3000,
        "category": 25,
        "brand": 151,
        "price_bucket": 11,
    }
    assert result["model"]["table_bytes"] == _table_bytes(result["model"]["cardinalities"], DIM)
    assert result["start_logits_max_abs_diff"] == 0.0
    assert result["device"] == describe_device(resolve_device("auto"))  # the default: CUDA when present
    for row in result["variants"].values():
        assert len(row["step_seconds"]) == 2
        assert all(s > 0 and math.isfinite(s) for s in row["step_seconds"])
        assert row["samples_per_second"] == pytest.approx(256 / statistics.median(row["step_seconds"]), rel=1e-4)
        assert math.isfinite(row["samples_per_second"]) and row["samples_per_second"] > 0
        assert row["peak_bytes"] > 0 and row["model_bytes"] > 0
        assert row["training_bytes"] == row["peak_bytes"] - row["model_bytes"]
    dense, lora = result["variants"]["dense"], result["variants"]["lora"]
    assert dense["trainable_parameters"] == result["model"]["parameters"]
    assert 0 < lora["trainable_parameters"] < dense["trainable_parameters"] / 100
    speed = lora["samples_per_second"] / dense["samples_per_second"]
    memory = lora["peak_bytes"] / dense["peak_bytes"]
    assert result["ratios"] == pytest.approx({"samples_per_second": speed, "peak_memory": memory})
    assert result["targets"] == TARGETS
    assert result["met"] == {"samples_per_second": speed >= 2.0, "peak_memory": memory <= 0.5}
    print_bench(result)
    table = capsys.readouterr().out
    assert f"{dense['samples_per_second']:,.0f}" in table and f"{result['ratios']['peak_memory']:.3f}" in table


@needs_proc
def test_memory_probe_sees_tables_gradients_and_moments(result):
    """The 200k × 64 user table dominates: dense fine-tuning holds it, its dense gradient and two
    Adam moments (≥ 3 extra copies while training); LoRA holds the frozen table and little else."""
    table = _table_bytes(result["model"]["cardinalities"], DIM)
    dense, lora = result["variants"]["dense"], result["variants"]["lora"]
    assert dense["model_bytes"] > 0.9 * table and lora["model_bytes"] > 0.9 * table
    assert dense["peak_bytes"] > 2 * table
    assert dense["training_bytes"] > 2.5 * table
    assert lora["training_bytes"] < 0.5 * table
    assert lora["peak_bytes"] < dense["peak_bytes"] / 2


def test_variants_start_from_the_same_base_and_both_train():
    spec = BenchSpec(model=model_options({"user": 700, "item": 900}, 16), lora_config=LORA.to_dict(), batch_size=64)
    batches = draw_batches(spec.model, spec.batch_size, seed=3)
    base = build_base(spec)
    with torch.no_grad():
        expected = copy.deepcopy(base).eval()(*batches[0].args)
    built = {name: prepare_variant(name, copy.deepcopy(base), LORA) for name in VARIANTS}
    for name, (model, _) in built.items():
        with torch.no_grad():
            assert torch.equal(model.eval()(*batches[0].args), expected), name
        model.train()
    dense_opts, lora_opts = built["dense"][1], built["lora"][1]
    assert not any(isinstance(o, LoraAdamW) for o in dense_opts)
    assert sum(len(g["params"]) for o in dense_opts for g in o.param_groups) == len(list(base.parameters()))
    assert any(isinstance(o, LoraAdamW) for o in lora_opts)
    user_table = base.sparse_arch.embedding_bag_collection.embedding_bags["t_user"].weight.detach().clone()
    for name, (model, optimizers) in built.items():
        train_step(model, optimizers, batches[1])
        with torch.no_grad():
            moved = (model.eval()(*batches[0].args) - expected).abs().max().item()
        assert moved > 1e-5, f"{name}: a step did not change the logits"
    tables = {name: dict(model.named_parameters()) for name, (model, _) in built.items()}
    dense_user = tables["dense"]["sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"]
    lora_user = next(p for n, p in tables["lora"].items() if n.endswith("t_user.weight"))
    assert not torch.equal(dense_user, user_table)
    assert torch.equal(lora_user, user_table) and not lora_user.requires_grad


def test_power_law_ids_follow_the_law():
    rows, count, s = 1000, 200_000, 1.05
    ids = power_law_ids(rows, count, torch.Generator().manual_seed(7), exponent=s)
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < rows
    shares = np.sort(np.bincount(ids.numpy(), minlength=rows))[::-1] / count

    def cdf(x):  # P(rank < x) of the density ∝ x^-s on [1, rows + 1), float64
        return (x ** (1 - s) - 1) / ((rows + 1.0) ** (1 - s) - 1)

    assert shares[0] == pytest.approx(cdf(2.0), abs=0.01)
    assert shares[:10].sum() == pytest.approx(cdf(11.0), abs=0.01)
    assert shares[:100].sum() == pytest.approx(cdf(101.0), abs=0.01)


def test_draw_batches_shapes_ranges_and_seed():
    options = model_options({"user": 5000, "item": 2000}, 8)
    batches = draw_batches(options, 128, seed=5)
    again = draw_batches(options, 128, seed=5)
    assert len(batches) == 4
    for batch, twin in zip(batches, again):
        dense, kjt = batch.args
        assert dense.shape == (128, 2) and batch.labels.shape == (128,)
        assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
        ids = kjt.to_dict()
        assert list(ids) == list(SHOP_SCHEMA.sparse_features)
        for feature, jagged in ids.items():
            assert jagged.values().shape == (128,) and (jagged.lengths() == 1).all()
            assert 0 <= int(jagged.values().min()) and int(jagged.values().max()) < options["cardinalities"][feature]
        assert torch.equal(kjt.values(), twin.args[1].values()) and torch.equal(dense, twin.args[0])
    assert not torch.equal(batches[0].args[0], batches[1].args[0])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"rows_per_table": {"country": 10}}, ["rows_per_table", "country"]),
        ({"rows_per_table": {"user": 0}}, ["rows_per_table['user']"]),
        ({"steps": 0}, ["steps"]),
        ({"rounds": 1.5}, ["rounds"]),
        ({"batch_size": -3}, ["batch_size"]),
        ({"base": "somewhere", "rows_per_table": {"user": 10}}, ["rows_per_table", "base"]),
        ({"embedding_dim": 0}, ["embedding_dim"]),
        ({"device": "tpu"}, ["device", "tpu"]),
    ],
)
def test_bad_arguments_name_themselves(kwargs, words):
    with pytest.raises(ValueError) as info:
        run_bench(progress=False, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_unknown_variant_and_bad_spec():
    spec = BenchSpec(model=model_options({"user": 50, "item": 50}, 8), lora_config=LORA.to_dict(), batch_size=8)
    with pytest.raises(ValueError, match="variant 'sgd'"):
        prepare_variant("sgd", build_base(spec), LORA)
    with pytest.raises(ValueError, match="--spec"):
        BenchSpec.from_json('{"modle": {}}')
    assert BenchSpec.from_json(spec.to_json()) == spec


def _shop_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user": rng.integers(0, 300, rows),
            "item": rng.integers(0, 200, rows),
            "category": rng.choice(list("abcdef"), rows),
            "brand": rng.choice(list("pqrstuvw"), rows),
            "price_bucket": rng.integers(0, 10, rows),
            "price": rng.lognormal(2.0, 1.0, rows),
            "position": rng.integers(0, 10, rows),
            "label": rng.integers(0, 2, rows),
            "market": rng.choice(["UK", "DE"], rows),
            "timestamp": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 86400 * 30, rows), unit="s"),
        }
    )


def test_base_checkpoint_is_measured_with_its_own_sizes(tmp_path, monkeypatch):
    encoder = FeatureEncoder().fit(_shop_frame(2000, seed=4), SHOP_SCHEMA)
    torch.manual_seed(11)
    saved = build_click_model(encoder.cardinalities, 2, embedding_dim=16, dense_arch=(32, 16), over_arch=(64, 32))
    save_base(tmp_path / "base", saved, encoder)
    spec = BenchSpec(model={}, lora_config=LORA.to_dict(), batch_size=32, base=str(tmp_path / "base"))
    loaded = build_base(spec)
    batch = draw_batches(saved.spec, 32, seed=2)[0]
    with torch.no_grad():
        assert torch.equal(loaded(*batch.args), saved.eval()(*batch.args))
    if not can_measure_memory():
        return
    # the probes in this process (fresh processes are tested above): same code, no interpreter start-up
    monkeypatch.setattr(bench, "run_memory_probes", lambda variants, spec: {v: memory_probe(v, spec) for v in variants})
    result = run_bench(base=tmp_path / "base", batch_size=32, steps=1, rounds=1, progress=False)
    assert result["model"]["source"] == "checkpoint"
    assert result["model"]["cardinalities"] == encoder.cardinalities
    assert result["model"]["embedding_dim"] == 16
    # in this warm process the allocator reuses freed memory: the marks are read, not their size
    assert all(isinstance(row["peak_bytes"], int) for row in result["variants"].values())
    assert result["variants"]["dense"]["trainable_parameters"] == sum(p.numel() for p in saved.parameters())
    assert result["start_logits_max_abs_diff"] == 0.0
