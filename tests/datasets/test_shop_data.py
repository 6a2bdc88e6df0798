"""The embedded default data: the committed file equals a fresh run of its generator, and the
generator makes what the data card says (power-law popularity, markets that differ)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from recpeft.datasets.synthetic import EMBEDDED_PATH, ShopSpec, load_shop, make_shop

ROOT = Path(__file__).resolve().parents[2]


def test_committed_file_is_a_fresh_run_bit_for_bit(tmp_path):
    fresh = tmp_path / "shop.parquet"
    subprocess.run(
        [sys.executable, str(ROOT / "data" / "make_shop.py"), "--out", str(fresh)], check=True, capture_output=True
    )
    assert fresh.read_bytes() == EMBEDDED_PATH.read_bytes()
    check = subprocess.run(
        [sys.executable, str(ROOT / "data" / "make_shop.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    pd.testing.assert_frame_equal(load_shop(), make_shop(), check_exact=True)


def test_check_fails_on_a_changed_file(tmp_path):
    changed = load_shop()
    changed.loc[5, "label"] = 1 - changed.loc[5, "label"]
    path = tmp_path / "shop.parquet"
    changed.to_parquet(path, index=False)
    check = subprocess.run(
        [sys.executable, str(ROOT / "data" / "make_shop.py"), "--check", "--out", str(path)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "differs" in check.stderr


def test_generator_properties():
    spec = ShopSpec(sessions=3000, seed=3)
    frame = make_shop(spec, with_truth=True)
    assert len(frame) == 3000 * spec.slate and frame["timestamp"].is_monotonic_increasing
    assert 0.03 < frame["label"].mean() < 0.2
    # power law: the top 1% of items get far more than 1% of impressions
    counts = frame["item"].value_counts()
    assert counts.head(spec.num_items // 100).sum() > 0.2 * len(frame)
    # each user lives in one market; a brand sells in at most two categories
    assert (frame.groupby("user")["market"].nunique() == 1).all()
    assert (frame.groupby("brand", observed=True)["category"].nunique() <= 2).all()
    # the true logit orders clicks (its AUC is far above chance) and markets click differently per category
    import torch

    from recpeft.metrics import auc

    assert auc(torch.tensor(frame["true_logit"].to_numpy()), torch.tensor(frame["label"].to_numpy())) > 0.75
    rates = frame.pivot_table(index="category", columns="market", values="label", observed=True)
    assert np.nanstd(rates.to_numpy() - rates.to_numpy().mean(1, keepdims=True)) > 0.02
    # same spec and seed → same rows; another seed → other rows
    pd.testing.assert_frame_equal(make_shop(spec), make_shop(spec).copy())
    assert not make_shop(ShopSpec(sessions=3000, seed=4))["label"].equals(make_shop(spec)["label"])
