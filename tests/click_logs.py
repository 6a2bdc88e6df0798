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
    # --no-keep-initial: the tests tell the adapter's scores from the base's, and on this small
    # log the base can win on validation
    finetune = ["finetune", str(log), *ROLES, "--base", str(base), "--segment", "south", "--epochs", "1"]
    finetune.append("--no-keep-initial")
    assert main([*finetune, "--out", str(adapter)]) == 0
    return {"root": root, "log": log, "base": base, "adapter": adapter, "finetune": finetune}


def assert_initial_adapter(folder) -> None:
    """The adapter saved in ``folder`` is as initialised, a zero delta: every Linear layer's B is
    zero and no table row of A was touched (and the file has both kinds, so this checks them)."""
    from recpeft.utils.integrity import read_safetensors

    tensors = read_safetensors(folder / "adapter_model.safetensors")
    linear_b = [k for k in tensors if k.endswith("lora_B.weight") and "embedding" not in k]
    table_rows = [k for k in tensors if k.endswith("lora_embedding_A.rows")]
    assert linear_b and table_rows, sorted(tensors)
    for key in linear_b:
        assert not tensors[key].any(), (folder, key)
    for key in table_rows:
        assert tensors[key].numel() == 0, (folder, key)


def one_line_error(argv, capsys, *fragments) -> str:
    """Run ``recpeft argv``; assert it fails with one stderr line ``recpeft <cmd>: error: ...``
    holding every fragment; return that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"recpeft {argv[0]}: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


#: Routed rows run the same float32 ops as the merged model up to the order of the LoRA terms and
#: of W + s·B·A (tests/apps/test_adapter_bank.py): 2^-16 relative is 100× those few roundings,
#: and the base in place of an adapter fails it.
ROUTED_REL = 2.0**-16
#: the log's columns as a Schema (the ROLES flags)
SCHEMA = dict(user="uid", item="sku", label="clicked", segment="country", timestamp="ts", categorical=("cat",))
SCHEMA["dense"] = ("price",)


def new_id_encoded(encoded, rows: pd.DataFrame, folder, encoder):
    """``encoded`` with the ids of the adapter in ``folder`` where it has new-id rows, worked out
    from its new_ids.json by hand: value u_j of feature f → V_f + j, V_f the base table's rows."""
    import dataclasses
    import json
    from pathlib import Path

    import torch

    path = Path(folder) / "new_ids.json"
    if not path.is_file():
        return encoded
    sparse = dict(encoded.sparse)
    for feature, values in json.loads(path.read_text())["values"].items():
        position = rows[feature].map({v: j for j, v in enumerate(values)})
        take = position.notna().to_numpy(copy=True)
        ids = sparse[feature].clone()
        ids[torch.from_numpy(take)] = torch.tensor(
            encoder.cardinalities[feature] + position[take].astype("int64").to_numpy(), dtype=ids.dtype
        )
        sparse[feature] = ids
    return dataclasses.replace(encoded, sparse=sparse)


def merged_logits(base_dir, adapters: dict, frame: pd.DataFrame):
    """An independent path to routed scores: float64 logits [N] of ``frame``'s rows, each row by
    the base with its segment's adapter (``adapters``: segment → folder) merged into the weights
    (merge_and_unload; an adapter's new ids encoded by :func:`new_id_encoded`), the base alone
    for other segments."""
    import dataclasses

    import torch

    from recpeft.apps.base_checkpoint import load_base
    from recpeft.datasets import ClickBatches, Schema, load_interactions
    from recpeft.peft.model import PeftModel
    from recpeft.train.trainer import predict

    rows = load_interactions(frame, Schema(**{**SCHEMA, "label": None, "timestamp": None}))
    base, encoder = load_base(base_dir)
    encoded = encoder.transform(rows, unseen="oov")
    source = ClickBatches(dataclasses.replace(encoded, labels=torch.zeros(len(rows))))
    logits = predict(base, source).double()
    for segment, folder in adapters.items():
        mask = torch.from_numpy((rows["country"] == segment).to_numpy(copy=True))
        if mask.any():
            merged = PeftModel.from_pretrained(load_base(base_dir)[0], folder).merge_and_unload()
            own = ClickBatches(new_id_encoded(source.encoded, rows, folder, encoder))
            logits[mask] = predict(merged, own.subset(mask)).double()
    return logits


def metric_slacks(reference_logits, labels, rel: float = ROUTED_REL) -> tuple[float, float]:
    """How far AUC and LogLoss of logits within ``rel``·max|z| of ``reference_logits`` [N] can be
    from those of the reference: AUC moves only through (positive, negative) pairs whose gap is
    within twice that (each flips at most 1/(P·N)); LogLoss = mean softplus(z) − y·z is 1-Lipschitz
    in each z, plus float32 summation, γ_N·(max|z| + 1)."""
    import torch

    from reference_math import gamma

    z, y = reference_logits.double(), torch.as_tensor(labels).double() > 0.5
    width = rel * float(z.abs().max())
    gaps = (z[y][:, None] - z[~y][None, :]).abs()
    auc = float((gaps <= 2 * width).sum()) / max(1, gaps.numel())
    return auc, width + gamma(len(z)) * (float(z.abs().max()) + 1)
