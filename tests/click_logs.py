"""A small click log for the command-line tests, and the flags that name its columns."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recpeft.cli import main

ROLES = ["--user", "uid", "--item", "sku", "--label", "clicked", "--segment-col", "country", "--timestamp", "ts"]
ROLES += ["--categorical", "cat", "--dense", "price", "--quiet"]


def write_log(
    path, seed=0, rows=1500, one_label_after=None, new_in_south=(), isle_rows=0, isle_at=None
) -> pd.DataFrame:
    """Write a CSV click log of two segments ('north', 'south') over 90 days of 2025; with
    ``one_label_after`` (a date), 'south' rows from then on are all 0; with ``new_in_south`` (id
    columns, 'uid' or 'sku'), 'south' has ids of its own there; with ``isle_rows``, a third small
    segment 'isle' of that many more rows (all at time ``isle_at`` when given)."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 60, rows)
    frame = pd.DataFrame(
        {
            "uid": rng.integers(0, 80, rows),
            "sku": item,
            "cat": [f"c{c}" for c in item % 5],
            "price": np.exp(rng.normal(2, 0.5, rows)),
            "clicked": (rng.random(rows) < 0.3).astype(int),
            "country": rng.choice(["north", "south"], rows),
            "ts": pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 90 * 86400, rows), "s"),
        }
    )
    for column in new_in_south:
        frame.loc[frame["country"] == "south", column] += 10_000
    if isle_rows:
        isle = frame.sample(isle_rows, random_state=seed).assign(country="isle")
        if isle_at is not None:
            isle["ts"] = pd.Timestamp(isle_at)
        frame = pd.concat([frame, isle], ignore_index=True)
    if one_label_after is not None:
        frame.loc[(frame["country"] == "south") & (frame["ts"] >= pd.Timestamp(one_label_after)), "clicked"] = 0
    frame.to_csv(path, index=False)
    return frame


def pretrained(root) -> dict:
    """A log under ``root``, a base pretrained on it and a LoRA adapter fine-tuned on its 'south'
    rows, through the command line; returns their paths and the finetune argv (without --out)."""
    log, base, adapter = root / "log.csv", root / "base", root / "adapter"
    write_log(log)
    assert main(["pretrain", str(log), *ROLES, "--out", str(base), "--epochs", "1", "--embedding-dim", "8"]) == 0
    finetune = ["finetune", str(log), *ROLES, "--base", str(base), "--segment", "south", "--epochs", "1"]
    assert main([*finetune, "--out", str(adapter)]) == 0
    return {"root": root, "log": log, "base": base, "adapter": adapter, "finetune": finetune}


def one_line_error(argv, capsys, *fragments) -> str:
    """Run ``recpeft argv``; assert it fails with one stderr line ``recpeft <cmd>: error: ...``
    holding every fragment; return that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"recpeft {argv[0]}: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err
