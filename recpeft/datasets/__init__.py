"""Data in: interaction tables as pandas DataFrames, checked, encoded, split and batched into the
``Batch`` / ``BatchSource`` form the Trainer consumes; the embedded shop's generator and schema.
May import: ``recpeft.peft``, ``recpeft.layers``, ``recpeft.kernels``, ``recpeft.utils`` (it needs
none of them but utils today); not its siblings ``models`` and ``metrics``, nor anything above.


schema = Schema(segment="market", timestamp="day", categorical=("category",), dense=("price",))
frame = load_interactions("log.parquet", schema)            # or load_movielens / load_criteo
parts = split_by_time(frame, schema)                         # per-segment time split
encoder = FeatureEncoder().fit(parts.train, schema)          # vocabularies, dense statistics
train = ClickBatches(encoder.transform(parts.train), route={"DE": 0})   # → KeyedJaggedTensor batches
"""

from recpeft.utils.lazy import lazy_exports

_EXPORTS = {
    "Batch": ".batch",
    "BatchSource": ".batch",
    "ClickBatches": ".click_batches",
    "EncodedInteractions": ".encoding",
    "FeatureEncoder": ".encoding",
    "Schema": ".schema",
    "TensorBatches": ".batch",
    "TimeSplit": ".splits",
    "check_segments": ".interactions",
    "leave_last_out": ".splits",
    "load_criteo": ".criteo",
    "load_interactions": ".interactions",
    "load_movielens": ".movielens",
    "split_by_time": ".splits",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
