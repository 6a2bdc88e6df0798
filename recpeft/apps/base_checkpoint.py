"""A base-model checkpoint: a folder that rebuilds a pretrained click model and the encoder that
turns a user's raw rows into its inputs.

    <dir>/model.safetensors   every tensor of the model's state_dict
    <dir>/model_config.json   {"format": 1, "model": build_click_model arguments, "metrics": {...}}
    <dir>/encoder.json        FeatureEncoder: schema, vocabularies, dense statistics, segments

Each file is written to a temporary name and renamed. Loading checks everything before it
returns: a missing file, a malformed config, a missing, unexpected or misshapen tensor or a
non-finite value raises an error naming the file and the key.

Example::

    save_base("runs/base", model, encoder, metrics={"auc": 0.74})
    model, encoder = load_base("runs/base")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recpeft.datasets import FeatureEncoder
from recpeft.models.dlrm import ClickDLRM, build_click_model
from recpeft.utils.atomic import atomic_path, atomic_write_text
from recpeft.utils.validation import check_state_keys, check_state_shapes, first_non_finite, read_json_object

FORMAT = 1
WEIGHTS, CONFIG, ENCODER = "model.safetensors", "model_config.json", "encoder.json"
#: written beside an adapter trained by ``recpeft finetune``: which base it belongs to
BASE_FINGERPRINT = "recpeft_base.json"


def save_base(directory: str | Path, model: ClickDLRM, encoder: FeatureEncoder, *, metrics: dict | None = None) -> Path:
    """Write ``model`` (a ClickDLRM, not wrapped in a PeftModel) and ``encoder`` to ``directory``."""
    if not isinstance(model, ClickDLRM):
        raise TypeError(f"save_base takes a ClickDLRM (merge or unload adapters first), got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"save_base: tensor {bad!r} holds non-finite values; not saving a broken model")
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    encoder.save(directory / ENCODER)
    config = {"format": FORMAT, "model": model.spec, "metrics": metrics or {}}
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def _read_config(path: Path) -> dict:
    config = read_json_object(path)
    if config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: not a recpeft base checkpoint config (need format {FORMAT} and a 'model' object)")
    return config


def read_base_config(directory: str | Path) -> dict:
    """The checkpoint's ``model_config.json`` (checked): {"format", "model": build_click_model
    arguments, "metrics": what ``save_base`` was given}, without loading any weights."""
    return _read_config(Path(directory) / CONFIG)


def load_base(directory: str | Path) -> tuple[ClickDLRM, FeatureEncoder]:
    """The model (eval mode) and encoder saved by :func:`save_base`."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, ENCODER):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory} is not a base checkpoint: {name} is missing (make one with `recpeft pretrain`)"
            )
    config = _read_config(directory / CONFIG)
    try:
        model = build_click_model(**config["model"])
    except TypeError as exc:
        raise ValueError(f"{directory / CONFIG}: the model settings do not fit build_click_model: {exc}") from None
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{directory / WEIGHTS} cannot be read: {exc}") from None
    expected = model.state_dict()
    mismatch = f"{directory / WEIGHTS} does not match {CONFIG}"
    check_state_keys(state, expected, where=mismatch)
    check_state_shapes(state, expected, where=mismatch)
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"{directory / WEIGHTS}: {bad!r} holds non-finite values")
    model.load_state_dict(state)
    encoder = FeatureEncoder.load(directory / ENCODER)
    if encoder.cardinalities != model.spec["cardinalities"]:
        raise ValueError(
            f"{directory / ENCODER} does not match {CONFIG}: encoder cardinalities "
            f"{encoder.cardinalities} vs model tables {model.spec['cardinalities']}"
        )
    return model.eval(), encoder


def checkpoint_bytes(directory: str | Path) -> int:
    """Size on disk of the checkpoint's weights file (what adapters are compared with)."""
    return (Path(directory) / WEIGHTS).stat().st_size


def base_fingerprint(directory: str | Path) -> str:
    """sha256 over the checkpoint's weights and encoder files: the identity of a base."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, ENCODER):
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_base_fingerprint(adapter_dir: str | Path, base_dir: str | Path) -> None:
    """Record in ``adapter_dir`` which base checkpoint the adapter was trained on."""
    atomic_write_text(
        Path(adapter_dir) / BASE_FINGERPRINT,
        json.dumps({"base": str(base_dir), "sha256": base_fingerprint(base_dir)}, indent=2) + "\n",
    )


def check_base_fingerprint(adapter_dir: str | Path, base_dir: str | Path, ignore: bool = False) -> None:
    """Refuse an adapter recorded as trained on another base (unless ``ignore``); adapters
    without a record (saved from Python) pass."""
    record = Path(adapter_dir) / BASE_FINGERPRINT
    if ignore or not record.is_file():
        return
    expected = read_json_object(record).get("sha256")
    if not isinstance(expected, str):
        raise ValueError(f'{record} is malformed: no "sha256" string')
    if expected != base_fingerprint(base_dir):
        raise ValueError(
            f"adapter {adapter_dir} was trained on another base than {base_dir} (recorded in {record}); "
            "pass --ignore-base-mismatch to apply it anyway"
        )
