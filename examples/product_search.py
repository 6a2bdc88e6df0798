"""Product search with a MiniLM item tower over the shop's product titles: frozen, LoRA, dense.

    python examples/product_search.py --out runs/search              # a few minutes on 2 cores
    python examples/product_search.py --quick --out /tmp/search      # seconds: 300 items, 5 steps

Method and metrics: :mod:`recpeft.apps.product_search`. Outputs in ``--out`` (refused when it
exists and is not empty, unless ``--overwrite``): ``product_search.json``, ``product_search.png``
(Recall@10 / NDCG@10 and samples/s per method), and the table on screen.
"""

from __future__ import annotations

import argparse

from recpeft.apps.demo_report import save_report
from recpeft.apps.product_search import run_product_search
from recpeft.utils.outputs import prepare_output


def print_rows(report: dict) -> None:
    print(
        f"{'method':<8}{'Recall@10':>10}{'NDCG@10':>9}{'Recall@50':>10}{'trainable':>12}{'share':>8}"
        f"{'samples/s':>10}{'train state MiB':>16}{'adapter KB':>11}"
    )
    for row in report["rows"]:
        adapter = f"{row['adapter_bytes'] / 1024:.0f}" if "adapter_bytes" in row else "-"
        print(
            f"{row['method']:<8}{row['hr@10']:>10.4f}{row['ndcg@10']:>9.4f}{row['hr@50']:>10.4f}"
            f"{row['trainable']:>12,}{100 * row['trainable_share']:>7.2f}%{row['samples_per_second']:>10.0f}"
            f"{row['training_state_bytes'] / 2**20:>16.1f}{adapter:>11}"
        )


def save_plot(path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["method"] for r in rows]
    figure, (quality, speed) = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.38
    for offset, key, label in ((-width / 2, "hr@10", "Recall@10"), (width / 2, "ndcg@10", "NDCG@10")):
        quality.bar([i + offset for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    quality.set_xticks(range(len(rows)), names)
    quality.set_title("test clicks ranked among the whole catalogue")
    quality.legend()
    speed.bar(names, [r["samples_per_second"] for r in rows], color="grey")
    speed.set_title("training samples/s")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/search", help="output folder (default: runs/search)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder's files")
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps per method (default: 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="clicks per step (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--quick", action="store_true", help="300 items and 5 steps: a smoke run")
    args = parser.parse_args(argv)
    out = prepare_output(args.out, overwrite=args.overwrite)
    settings = {"steps": 5, "max_items": 300} if args.quick else {"steps": args.steps}
    report = run_product_search(batch_size=args.batch_size, seed=args.seed, **settings)
    print_rows(report)
    out.mkdir(parents=True, exist_ok=True)
    save_report(out / "product_search.json", report)
    save_plot(out / "product_search.png", report)
    print(f"wrote {out / 'product_search.json'} and {out / 'product_search.png'}")
    return report


if __name__ == "__main__":
    main()
