"""Dense attention and Transformer-VQ on MQAR over several seeds, and a short window.

Five settings, each trained from --seeds (experiments/mqar.py):
  dense: exact attention;
  vq: the chapter's Transformer-VQ (T = M = 8, so every key is in the window);
  vq_short: the same with T = M = 4, so most keys are read only through the
    aggregated cache and get no gradient from the queries that read them;
  dense_tied, vq_tied: dense and vq with the output head of the first runs,
    the embeddings tied and read through a final LayerNorm (e_tie=True,
    e_preln=True): the head that stalled them.
Writes two CSVs: --out, one row per run (final held-out accuracy, loss,
codebook health, seconds), and --curves, the training accuracy and loss
averaged over every 25 steps.

    python experiments/mqar_seeds.py
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

# The head of the first runs: tied embeddings read through a final LN.
TIED = dict(e_tie=True, e_preln=True, e_scale=1.0)
SETTINGS = {
    "dense": dict(attention="dense"),
    "vq": dict(),
    "vq_short": dict(block_len=4, mem_len=4),
    "dense_tied": dict(attention="dense", **TIED),
    "vq_tied": dict(TIED),
}
FIELDS = ["setting", "seed", "accuracy", "loss", "codes_used", "c_entropy",
          "relative_err_mean", "seconds"]  # fmt: skip
EVERY = 25


def one(setting: str, seed: int, n_step: int):
    r = mqar.run(seed, n_step, **SETTINGS[setting])
    row = {"setting": setting, "seed": seed}
    row.update({k: r.get(k, "") for k in FIELDS[2:]})
    hist = r["history"]
    n = len(hist["accuracy"]) // EVERY * EVERY
    curves = [
        dict(setting=setting, seed=seed, step=(i + 1) * EVERY, accuracy=acc, loss=loss)
        for i, (acc, loss) in enumerate(
            zip(
                hist["accuracy"][:n].reshape(-1, EVERY).mean(1),
                hist["l_lm_per_token"][:n].reshape(-1, EVERY).mean(1),
                strict=True,
            )
        )
    ]
    print(row, flush=True)
    return row, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--n-step", type=int, default=mqar.N_STEP)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="book/data/mqar_seeds.csv")
    parser.add_argument("--curves", default="book/data/mqar_curves.csv")
    a = parser.parse_args()
    start = time.perf_counter()
    jobs = [(s, seed, a.n_step) for s in a.settings for seed in a.seeds]
    spawn = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    with ProcessPoolExecutor(a.jobs, mp_context=spawn) as pool:
        results = list(pool.map(one, *zip(*jobs, strict=True)))
    for path, rows in ((a.out, [r for r, _ in results]),
                       (a.curves, [c for _, cs in results for c in cs])):  # fmt: skip
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
