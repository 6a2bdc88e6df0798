"""What each ``recpeft`` sub-command does (the parser lives in cli.py).

    pretrain   DATA --out BASE                      train a base click model on every segment
    finetune   DATA --base BASE --segment S --out A  a LoRA adapter (or a dense copy) for one segment
    evaluate   DATA --base BASE [--adapter A]       AUC / LogLoss per segment on the rows after the cut
    merge      --base BASE --adapter A --out M      fold an adapter into the base: a new base checkpoint
    bench      [--base BASE]                        LoRA vs dense fine-tuning cost, side by side
    demo                                            the main job on the embedded shop
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import checkpoint_bytes, load_base, save_base
from .config import LoraConfig
from .datasets.sources import Roles, load_source
from .peft_model import PeftModel
from .report import save_report
from .train import TrainConfig
from .workflow import Method, click_metrics, default_lora_targets, finetune, prepare, pretrain


def _roles(args) -> Roles:
    split = lambda text: tuple(c for c in (text or "").split(",") if c)  # noqa: E731
    return Roles(user=args.user or None, item=args.item or None, label=args.label, segment=args.segment_col or None,
                 timestamp=args.timestamp or None, categorical=split(args.categorical), dense=split(args.dense),
                 segment_by=args.segment_by, criteo_segment=args.criteo_segment)


def _data(args, encoder=None):
    frame, schema = load_source(args.data, args.format, _roles(args))
    name = str(args.data) if args.data else "embedded shop"
    print(f"data: {len(frame):,} rows from {name}; features {list(schema.sparse_features)} + dense {list(schema.dense)}; "
          f"segments by {schema.segment!r}")
    return prepare(frame, schema, encoder=encoder, test_start=args.test_start, test_fraction=args.test_fraction,
                   valid_fraction=args.valid_fraction, name=name)


def _train_config(args, desc: str, **defaults) -> TrainConfig:
    values = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed")
              if getattr(args, k, None) is not None}
    return TrainConfig(**{**defaults, **values, "progress": not args.quiet, "desc": desc})


def cmd_pretrain(args) -> None:
    data = _data(args)
    options = {"kind": args.kind, "embedding_dim": args.embedding_dim, "dense_arch": (32, args.embedding_dim),
               "over_arch": (64, 32), "dropout": args.dropout}
    model, report = pretrain(data, model_options=options,
                             train_config=_train_config(args, "pretrain", epochs=6, batch_size=1024, lr=1e-3,
                                                        early_stopping_patience=1))
    test = click_metrics(model, data.segment_rows("test"))
    save_base(args.out, model, data.encoder, metrics={"valid_auc": report.best_metric, "test_auc": test["auc"]})
    print(f"pretrained {report.epochs_run} epochs ({report.samples_per_second:,.0f} samples/s): validation AUC "
          f"{report.best_metric:.4f}, test AUC {test['auc']:.4f}, LogLoss {test['log_loss']:.4f}; saved {args.out}")


def _lora_config(args, model, schema) -> LoraConfig:
    targets = [t for t in (args.targets or "").split(",") if t] or default_lora_targets(model, schema)
    return LoraConfig(r=args.r, lora_alpha=args.alpha or 2 * args.r, lora_dropout=args.lora_dropout,
                      target_modules=targets)


def cmd_finetune(args) -> None:
    base, encoder = load_base(args.base)
    data = _data(args, encoder)
    if args.segment not in data.segments:
        raise ValueError(f"segment {args.segment!r} is not in the data; its segments are {data.segments}")
    method = Method(args.method)
    config = _train_config(args, f"{method.value} {args.segment}", epochs=10, batch_size=512,
                           lr=3e-3 if method is Method.LORA else 1e-3)
    lora = _lora_config(args, base, data.schema) if method is Method.LORA else None
    model, report = finetune(base, data, args.segment, method, train_config=config, lora_config=lora)
    test = data.segment_rows("test", args.segment)
    before, after = click_metrics(base, test), click_metrics(model, test)
    out = Path(args.out)
    if method is Method.LORA:
        model.save_pretrained(out)
        size = (out / "adapter_model.safetensors").stat().st_size
        what = f"adapter {size / 1024:.1f} KB ({100 * size / checkpoint_bytes(args.base):.2f}% of the base)"
    else:
        save_base(out, model, encoder, metrics={"segment": args.segment, "test_auc": after["auc"]})
        what = "fine-tuned copy of the base"
    print(f"{args.segment}: {report.epochs_run} epochs, {report.samples_per_second:,.0f} samples/s; test AUC "
          f"base {before['auc']:.4f} → {after['auc']:.4f} (LogLoss {before['log_loss']:.4f} → "
          f"{after['log_loss']:.4f}) on {after['rows']:,} rows; saved the {what} to {out}")


def cmd_evaluate(args) -> None:
    base, encoder = load_base(args.base)
    data = _data(args, encoder)
    model = base
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
    segments = [args.segment] if args.segment else data.segments
    rows = []
    print(f"{'segment':<16}{'rows':>9}{'click rate':>11}{'AUC':>8}{'LogLoss':>9}")
    for segment in segments:
        metrics = click_metrics(model, data.segment_rows(args.part, segment))
        rows.append({"segment": segment, **metrics})
        print(f"{segment:<16}{metrics['rows']:>9,}{metrics['click_rate']:>11.3f}{metrics['auc']:>8.4f}"
              f"{metrics['log_loss']:>9.4f}")
    if args.json:
        save_report(args.json, {"base": str(args.base), "adapter": args.adapter, "part": args.part, "segments": rows})


def cmd_merge(args) -> None:
    base, encoder = load_base(args.base)
    merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    save_base(args.out, merged, encoder, metrics={"merged_adapter": str(args.adapter)})
    print(f"merged {args.adapter} into {args.base}; saved {args.out} (a base checkpoint: use it with --base)")


def cmd_bench(args) -> None:
    from .bench import print_bench, run_bench

    result = run_bench(base=args.base, progress=not args.quiet)
    print_bench(result)
    if args.json:
        save_report(args.json, result)
        print(f"wrote {args.json}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, progress=not args.quiet, fresh=args.fresh, markets=args.markets)
