"""Data in: interaction tables as pandas DataFrames, checked, encoded, split and batched.

    schema = Schema(segment="market", timestamp="day", categorical=("category",), dense=("price",))
    frame = load_interactions("log.parquet", schema)            # or load_movielens / load_criteo
    parts = split_by_time(frame, schema)                         # per-segment time split
    encoder = FeatureEncoder().fit(parts.train, schema)          # vocabularies, dense statistics
    train = ClickBatches(encoder.transform(parts.train), route={"DE": 0})   # → KeyedJaggedTensor batches
"""

from .click_batches import ClickBatches
from .criteo import load_criteo
from .encoding import EncodedInteractions, FeatureEncoder
from .interactions import check_segments, load_interactions
from .movielens import load_movielens
from .schema import Schema
from .splits import TimeSplit, leave_last_out, split_by_time

__all__ = [
    "ClickBatches",
    "EncodedInteractions",
    "FeatureEncoder",
    "Schema",
    "TimeSplit",
    "check_segments",
    "leave_last_out",
    "load_criteo",
    "load_interactions",
    "load_movielens",
    "split_by_time",
]
