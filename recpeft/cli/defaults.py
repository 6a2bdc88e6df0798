"""The ``recpeft`` command's defaults, as plain constants: the parser shows them in ``--help`` and
the commands apply them, so what the help says is what runs."""

#: pretraining's training settings where no flag gives one
PRETRAIN = {
    "epochs": 6,
    "batch_size": 1024,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "seed": 0,
    "stop_metric": "auc",
    "min_improvement": 0.0,
    "keep_initial": False,
}
#: fine-tuning's, with the peak learning rate per method in FINETUNE_LR. The base competes as
#: epoch -1 (keep_initial): a fine-tune that does not beat it on the segment's validation rows,
#: by more than min_improvement, is not kept
FINETUNE = {
    "epochs": 10,
    "batch_size": 512,
    "weight_decay": 0.0,
    "seed": 0,
    "stop_metric": "auc",
    "min_improvement": 0.0,
    "keep_initial": True,
}
FINETUNE_LR = {"lora": 3e-3, "dense": 1e-3}
#: the data-source settings a base records (data_source.json; each field is the flag of its name,
#: test_start is --test-start) where neither the flag nor the base gives one
SOURCES = {
    "segment_by": "gender",
    "criteo_segment": None,
    "test_start": None,
    "test_fraction": 0.2,
    "valid_fraction": 0.15,
    "exclude_segments": [],
    "min_segment_rows": 0,
}
#: what ``--stop-metric`` accepts: :class:`recpeft.train.StopMetric`'s values (kept here as text so
#: that ``--help`` needs no torch)
STOP_METRICS = ("auc", "logloss")
#: what ``finetune --method`` accepts: one method, or both trained side by side (with --segments)
METHODS = ("lora", "dense", "lora,dense")
#: rows ``recpeft score`` reads and scores at a time
CHUNK_ROWS = 16384
