"""Make the embedded default data, data/shop.parquet, bit for bit from the default spec.

    python data/make_shop.py            # (re)write data/shop.parquet
    python data/make_shop.py --check    # exit 1 unless the committed file equals a fresh run

The generator and its ground truth are documented in recpeft/datasets/synthetic.py; the data
card is data/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from recpeft.datasets.synthetic import EMBEDDED_PATH, ShopSpec, make_shop
from recpeft.utils.atomic import atomic_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=EMBEDDED_PATH)
    parser.add_argument("--check", action="store_true", help="compare the file with a fresh run instead of writing")
    args = parser.parse_args(argv)
    frame = make_shop(ShopSpec())
    if args.check:
        try:
            pd.testing.assert_frame_equal(pd.read_parquet(args.out), frame, check_exact=True)
        except AssertionError as exc:
            print(f"{args.out} differs from a fresh run: {exc}", file=sys.stderr)
            return 1
        print(f"{args.out}: equal to a fresh run ({len(frame):,} rows)")
        return 0
    with atomic_path(args.out) as tmp:
        frame.to_parquet(tmp, compression="zstd", index=False)
    print(f"wrote {args.out}: {len(frame):,} impressions, {args.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
