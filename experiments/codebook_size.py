"""Accuracy of a tiny Transformer-VQ on MQAR against the codebook size S.

For every S in --codes and every seed in --seeds, trains the chapter's VQ
model (experiments/mqar.py) and evaluates it on held-out batches. Writes one
CSV row per run: n_code, seed, accuracy, loss, codes_used (mean over GAUs and
heads of the codes with EMA count >= 1), c_entropy, relative_err_mean and
seconds. book/training.ipynb plots the committed CSV.

    python experiments/codebook_size.py
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mqar  # noqa: E402

FIELDS = ["n_code", "seed", "accuracy", "loss", "codes_used", "c_entropy",
          "relative_err_mean", "seconds"]  # fmt: skip


def one(n_code: int, seed: int, n_step: int) -> dict:
    """Train and evaluate one run."""
    result = mqar.run(seed, n_step, n_code=n_code)
    row = {"n_code": n_code, "seed": seed, **{k: result[k] for k in FIELDS[2:]}}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, nargs="+", default=[4, 8, 16, 64, 256])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-step", type=int, default=mqar.N_STEP)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="book/data/codebook_size.csv")
    a = parser.parse_args()
    start = time.perf_counter()
    jobs = [(s, seed, a.n_step) for s in a.codes for seed in a.seeds]
    spawn = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    with ProcessPoolExecutor(a.jobs, mp_context=spawn) as pool:
        rows = list(pool.map(one, *zip(*jobs, strict=True)))
    with open(a.out, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
