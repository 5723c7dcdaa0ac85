"""Speed of the replication gate's nearest-neighbour search (``eval/replication.nearest_tiled_l2``).

    .venv/bin/python benchmarks/replication_speed.py [--queries 2048] [--reference 8192] [--threads 2]

Random images at the quickstart's size (1×32×32, tiles of 8); prints query×reference pairs per
second for ``reduce=max`` and ``reduce=mean``. The quickstart compares 12,000 synthetic images with
30,000 private ones (3.6e8 pairs) plus a 5,000 × 30,000 calibration.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from synthset.eval.replication import nearest_tiled_l2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--reference", type=int, default=8192)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    q = rng.random((args.queries, 1, args.size, args.size), dtype=np.float32)
    r = rng.random((args.reference, 1, args.size, args.size), dtype=np.float32)
    result = {"queries": args.queries, "reference": args.reference, "threads": args.threads}
    for reduce in ("max", "mean"):
        nearest_tiled_l2(q[:64], r[:1024], args.tile, reduce)  # warm-up
        t0 = time.perf_counter()
        nearest_tiled_l2(q, r, args.tile, reduce)
        seconds = time.perf_counter() - t0
        result[reduce] = {"seconds": round(seconds, 2), "pairs_per_s": f"{args.queries * args.reference / seconds:.3g}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
