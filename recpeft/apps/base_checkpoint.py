"""A base-model checkpoint: a folder that rebuilds a pretrained click model and the encoder that
turns a user's raw rows into its inputs.

    <dir>/model.safetensors   every tensor of the model's state_dict
    <dir>/model_config.json   {"format": 1, "model": build_click_model arguments, "metrics": {...}}
    <dir>/encoder.json        FeatureEncoder: schema, vocabularies, dense statistics, segments
    <dir>/data_source.json    how the pretraining data was read and split (format, segmenting,
                              test start or fraction, validation fraction) and which segments
                              it left out (excluded by name, a minimum of rows), so that later
                              commands read the same segments and hold out the same test rows;
                              absent in bases saved before it existed, or without a record

The files are written as one set (a crash leaves the old checkpoint or the new one).
Loading checks everything before it returns: a missing file, a malformed config, a config that
does not fit the weight file's header (checked before any table is allocated), a missing,
unexpected, misshapen or corrupt tensor (sha256 recorded at save) or a non-finite value raises
an error naming the file and the key or field.

Example::

    save_base("runs/base", model, encoder, metrics={"auc": 0.74})
    model, encoder = load_base("runs/base")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from recpeft.datasets import FeatureEncoder
from recpeft.models.dlrm import ClickDLRM, build_click_model, table_name
from recpeft.utils.atomic import atomic_files, recover_folder
from recpeft.utils.integrity import header_shapes, read_safetensors, write_safetensors
from recpeft.utils.validation import check_state_keys, check_state_shapes, first_non_finite, read_json_object

FORMAT = 1
WEIGHTS, CONFIG, ENCODER = "model.safetensors", "model_config.json", "encoder.json"
DATA_SOURCE = "data_source.json"
#: the fields of data_source.json and the types each may hold
DATA_SOURCE_FIELDS = {
    "format": (str,),
    "segment_col": (str, type(None)),  # interactions: the segment column
    "segment_by": (str,),  # movielens: the user attribute naming segments
    "criteo_segment": (str, type(None)),  # criteo: the C column naming segments
    "test_start": (str, int, float),  # the test cut as given, or absent ...
    "test_fraction": (float,),  # ... and each segment's latest share instead
    "valid_fraction": (float,),
    "exclude_segments": (list,),  # segment names the base was pretrained without
    "min_segment_rows": (int,),  # segments with fewer rows were left out of pretraining
}
#: written beside an adapter trained by ``recpeft finetune``: which base it belongs to
BASE_FINGERPRINT = "recpeft_base.json"


def save_base(
    directory: str | Path,
    model: ClickDLRM,
    encoder: FeatureEncoder,
    *,
    metrics: dict | None = None,
    data_source: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (a ClickDLRM, not wrapped in a PeftModel), ``encoder``, the
    ``data_source`` record (:data:`DATA_SOURCE_FIELDS`; None: no record) and ``extra_files``
    (file name → text, e.g. the run's settings) to ``directory`` as one
    set (:func:`recpeft.utils.atomic.atomic_files`: a crash leaves the old checkpoint or the new
    one, never new weights beside an old encoder); the weights file records the sha256 of its
    tensors (:mod:`recpeft.utils.integrity`)."""
    if not isinstance(model, ClickDLRM):
        raise TypeError(f"save_base takes a ClickDLRM (merge or unload adapters first), got {type(model).__name__}")
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"save_base: tensor {bad!r} holds non-finite values; not saving a broken model")
    config = {"format": FORMAT, "model": model.spec, "metrics": metrics or {}}
    config_text = json.dumps(config, indent=2) + "\n"
    if data_source is not None:
        _checked_source(data_source, "save_base")
    with atomic_files(directory) as tmp:
        write_safetensors(state, tmp / WEIGHTS)
        encoder.save(tmp / ENCODER)
        (tmp / CONFIG).write_text(config_text)
        if data_source is not None:
            (tmp / DATA_SOURCE).write_text(json.dumps(data_source, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


def _checked_source(record: dict, where: str) -> dict:
    """``record`` if each field is one of :data:`DATA_SOURCE_FIELDS` with a value of its type."""
    for field, value in record.items():
        types = DATA_SOURCE_FIELDS.get(field)
        if types is None:
            raise ValueError(f"{where}: unknown data source field {field!r}; the fields are {list(DATA_SOURCE_FIELDS)}")
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{where}: field {field!r} = {value!r} is not a {' or '.join(t.__name__ for t in types)}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: field {field!r} = {value!r} is not a list of names")
    return record


def read_data_source(directory: str | Path) -> dict | None:
    """The checkpoint's ``data_source.json`` record (checked), or None for a base without one."""
    recover_folder(directory)
    path = Path(directory) / DATA_SOURCE
    return _checked_source(read_json_object(path), str(path)) if path.is_file() else None


def _read_config(path: Path) -> dict:
    config = read_json_object(path)
    if config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: not a recpeft base checkpoint config (need format {FORMAT} and a 'model' object)")
    return config


def read_base_config(directory: str | Path) -> dict:
    """The checkpoint's ``model_config.json`` (checked): {"format", "model": build_click_model
    arguments, "metrics": what ``save_base`` was given}, without loading any weights."""
    recover_folder(directory)
    return _read_config(Path(directory) / CONFIG)


def _check_config_fits_weights(directory: Path, spec: dict) -> None:
    """Refuse a config whose model does not match the weight file's header, before any tensor is
    allocated: the model is built on the meta device and its shapes compared with the header's."""
    shapes = header_shapes(directory / WEIGHTS)
    try:
        with torch.device("meta"):
            skeleton = build_click_model(**spec).state_dict()
    except TypeError as exc:
        raise ValueError(f"{directory / CONFIG}: the model settings do not fit build_click_model: {exc}") from None
    mismatch = f"{directory / WEIGHTS} does not match {CONFIG}"
    cardinalities = spec.get("cardinalities") or {}
    for feature, rows in cardinalities.items():
        suffix = f".{table_name(feature)}.weight"
        key = next((k for k in skeleton if k.endswith(suffix)), None)
        if key in shapes and shapes[key][:1] != [rows]:
            raise ValueError(
                f"{mismatch}: field model.cardinalities.{feature} = {rows} "
                f"but tensor {key} has shape {tuple(shapes[key])}"
            )
    check_state_keys(shapes, skeleton, where=mismatch)
    check_state_shapes(shapes, skeleton, where=mismatch)


def load_base(directory: str | Path) -> tuple[ClickDLRM, FeatureEncoder]:
    """The model (eval mode) and encoder saved by :func:`save_base`. A save of ``directory`` that
    was killed half-way is finished first (:func:`recpeft.utils.atomic.recover_folder`); the config
    is checked against the weight file's header before the model is built, and the tensors against
    their recorded sha256."""
    directory = Path(directory)
    recover_folder(directory)
    for name in (WEIGHTS, CONFIG, ENCODER):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory} is not a base checkpoint: {name} is missing (make one with `recpeft pretrain`)"
            )
    config = _read_config(directory / CONFIG)
    _check_config_fits_weights(directory, config["model"])
    model = build_click_model(**config["model"])
    state = read_safetensors(directory / WEIGHTS)
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
    recover_folder(directory)
    digest = hashlib.sha256()
    for name in (WEIGHTS, ENCODER):
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_fingerprint_files(base_dir: str | Path) -> dict[str, str]:
    """The record of which base checkpoint an adapter was trained on, as ``{file name: text}`` for
    :meth:`recpeft.PeftModel.save_pretrained`'s ``extra_files``: it is saved in the same atomic
    set as the adapter, so a crash never pairs a new adapter with an old record."""
    record = {"base": str(base_dir), "sha256": base_fingerprint(base_dir)}
    return {BASE_FINGERPRINT: json.dumps(record, indent=2) + "\n"}


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
