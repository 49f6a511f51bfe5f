"""Tiny byte-level language models on the Python standard library's sources.

Trains a Transformer-VQ (attention="vq") and a dense model of the same shapes
(attention="dense", no codebook) on the .py files of the running CPython's
standard library, found through `sysconfig.get_paths()["stdlib"]`, with
`tvq.train`'s jitted train step (truncated backpropagation over update
windows, AdamW). The two train in alternation, one batch each, on the same
batches, until each has spent the same training time (--seconds, not counting
its first step, which compiles): both see the same load on a shared machine.

Data: every .py file under the stdlib directory except those in test, tests,
idlelib and site-packages folders, ordered by (CRC-32 of the relative path,
path). A file is held out when that CRC-32 is 0 mod 20; training takes files
in that order until --train-bytes, held-out files until --heldout-bytes.
Files end with a blank line and are concatenated. The files differ between
Python versions: book/data/bytes_files.csv lists every file used (split,
path, bytes) and bytes_results.csv the Python version and a SHA-256 of each
split.

Writes under book/data/: bytes_vq/ and bytes_dense/ (the models, exported
with `tvq.checkpoint.save_params`: float32 parameters and the config, read
back with `tvq.checkpoint.load_params`), bytes_curve.csv (training loss per
optimizer step against training seconds), bytes_results.csv,
bytes_files.csv and bytes_loss_by_position.csv (held-out loss by position in
sequences of --long-len bytes, both models).

Usage: python experiments/train_bytes.py [--seconds 300] [--out book/data]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

FORCE_DEVICES = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    flag
    for flag in os.environ.get("XLA_FLAGS", "").split()
    if not flag.startswith(FORCE_DEVICES)
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tvq  # noqa: E402
from tvq import train as tvq_train  # noqa: E402
from tvq.checkpoint import save_params  # noqa: E402
from tvq.sample import generate, state_nbytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
LOG2E = 1.0 / np.log(2.0)
MODEL = dict(
    n_vocab=256,
    d_model=128,
    d_k=64,
    d_v=256,
    n_head=1,
    n_code=64,
    n_layer=2,
    block_len=64,
    mem_len=64,
    agg_cache=True,
    grad_thru_cache=True,
    pe_abs=False,
    pe_lam=10_000,
    c_beta=1e-4,
    c_gamma=0.99,
    e_tie=True,
    e_preln=True,
    e_scale=128**-0.5,
    p_dropemb=0.0,
    p_dropsin=0.0,
    p_dropres=0.0,
    p_droplyr=0.0,
    p_nucleus=0.8,
    sequence_len=512,
    update_len=256,
    global_batch_size=8,
    optimizer="adamw",
    lr_max=3e-3,
    lr_schedule="constant",
    wd_lam=0.0,
    grad_clip=1.0,
    n_warmup_step=20,
    n_max_step=100_000,
    is_train=True,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="per model")
    p.add_argument("--train-bytes", type=int, default=4_000_000)
    p.add_argument("--heldout-bytes", type=int, default=262_144)
    p.add_argument("--long-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "book" / "data"))
    return p.parse_args(argv)


def stdlib_split(train_bytes: int, heldout_bytes: int):
    """(root, {"train": [(path, bytes)], "heldout": [...]}) in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not SKIP_DIRS & set(p.relative_to(root).parts)
    )
    order = sorted(paths, key=lambda p: (zlib.crc32(p.encode()), p))
    split = {"train": [], "heldout": []}
    budget = {"train": train_bytes, "heldout": heldout_bytes}
    for path in order:
        name = "heldout" if zlib.crc32(path.encode()) % 20 == 0 else "train"
        if sum(n for _, n in split[name]) >= budget[name]:
            continue
        split[name].append((path, (root / path).stat().st_size))
    return root, split


def read_split(root: Path, files) -> np.ndarray:
    """[L] uint8: the files' bytes, each followed by a blank line."""
    data = b"".join((root / path).read_bytes() + b"\n\n" for path, _ in files)
    return np.frombuffer(data, np.uint8)


def train_batches(data: np.ndarray, batch: int, length: int, seed: int):
    """Endless batches of random windows of the byte stream."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - length - 1, size=batch)
        windows = np.stack([data[s : s + length + 1] for s in starts]).astype(np.int32)
        yield dict(
            inputs=windows[:, :-1],
            targets=windows[:, 1:],
            loss_mask=np.ones([batch, length], np.int32),
        )


def eval_windows(data: np.ndarray, length: int, n_max: int) -> dict:
    """Consecutive non-overlapping windows of the held-out stream, as a batch."""
    n = min((len(data) - 1) // length, n_max)
    x = np.stack([data[i * length : i * length + length + 1] for i in range(n)])
    x = x.astype(np.int32)
    return dict(inputs=x[:, :-1], targets=x[:, 1:], loss_mask=np.ones_like(x[:, 1:]))


def nll_by_position(config, params, batch, chunk=8) -> np.ndarray:
    """[B, L] negative log-likelihood in nats, with `tvq.train.eval_step`."""
    step = jax.jit(lambda p, b: tvq_train.eval_step(config, p, b)["nll"])
    parts = []
    for i in range(0, len(batch["inputs"]), chunk):
        part = {k: jnp.asarray(v[i : i + chunk]) for k, v in batch.items()}
        parts.append(np.asarray(step(params, part)))
    return np.concatenate(parts)


def sample_text(config, params, prompt: bytes, n: int, seed: int) -> str:
    tokens = jnp.asarray(np.frombuffer(prompt, np.uint8)[None].astype(np.int32))
    out = generate(config, params, tokens, max_new_tokens=n, rng=jax.random.key(seed))
    return bytes(np.asarray(out[0], np.uint8)).decode("utf-8", "replace")


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out)
    root, split = stdlib_split(args.train_bytes, args.heldout_bytes)
    data = {name: read_split(root, files) for name, files in split.items()}
    version = sys.version.split()[0]
    print(f"Python {version}, stdlib {root}")
    for name, files in split.items():
        print(f"{name}: {len(files)} files, {len(data[name])} bytes")

    configs = {
        name: tvq.TransformerConfig.create(**MODEL, attention=name)
        for name in ("vq", "dense")
    }
    mesh = tvq.make_data_mesh()
    models = {}
    for name, config in configs.items():
        state = tvq_train.init_train_state(config, jax.random.key(args.seed))
        models[name] = dict(
            step=tvq_train.make_train_step(config, mesh),
            state=tvq_train.replicate(state, mesh),
            batches=train_batches(
                data["train"], MODEL["global_batch_size"], MODEL["sequence_len"], 1
            ),
            seconds=0.0,
            compiled=False,
        )
    rng_data = tvq_train.replicate(jax.random.key_data(jax.random.key(1)), mesh)
    curve = []
    start = last_print = time.perf_counter()
    while any(m["seconds"] < args.seconds for m in models.values()):
        for name, m in models.items():
            if m["seconds"] >= args.seconds:
                continue
            batch = tvq_train.shard_batch(next(m["batches"]), mesh)
            t0 = time.perf_counter()
            m["state"], metrics = m["step"](m["state"], batch, rng_data)
            losses = np.asarray(metrics["l_lm_per_token"].addressable_data(0))
            dt = time.perf_counter() - t0
            if not m["compiled"]:  # the first step compiles: not counted
                m["compiled"], m["compile_s"] = True, dt
                continue
            m["seconds"] += dt
            step = int(m["state"].step.addressable_data(0))
            for i, loss in enumerate(losses):
                curve.append(
                    dict(
                        model=name,
                        step=step - len(losses) + i + 1,
                        train_seconds=round(m["seconds"], 3),
                        train_bits_per_byte=round(float(loss) * LOG2E, 5),
                    )
                )
        if time.perf_counter() - last_print > 30:
            last_print = time.perf_counter()
            done = {n: f"{m['seconds']:.0f} s" for n, m in models.items()}
            print(f"{last_print - start:.0f} s elapsed, trained {done}", flush=True)

    heldout_len = MODEL["sequence_len"]
    heldout = eval_windows(data["heldout"], heldout_len, 512)
    long = eval_windows(data["heldout"], args.long_len, 64)
    results, by_position = [], {}
    for name, m in models.items():
        params = jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0)), m["state"].params
        )
        m["params"] = params
        eval_config = configs[name].replace(is_train=False)
        bpb = float(np.mean(nll_by_position(eval_config, params, heldout)) * LOG2E)
        nll = nll_by_position(eval_config, params, long)
        by_position[name] = np.mean(nll, axis=0) * LOG2E
        steps = int(m["state"].step.addressable_data(0))
        results += [
            (name, "heldout_bits_per_byte", round(bpb, 4)),
            (name, "optimizer_steps", steps),
            (name, "train_seconds", round(m["seconds"], 1)),
            (name, "compile_seconds", round(m["compile_s"], 1)),
            (name, "n_params", sum(x.size for x in jax.tree.leaves(params))),
            (name, "state_nbytes_at_batch_1", state_nbytes(
                eval_config, 1, args.long_len)),
        ]  # fmt: skip
        print(f"{name}: {steps} steps in {m['seconds']:.0f} s, held-out {bpb:.3f} bpb")
        export = out_dir / f"bytes_{name}"
        shutil.rmtree(export, ignore_errors=True)
        save_params(export, configs[name], params)
    for name, files in split.items():
        digest = hashlib.sha256(data[name].tobytes()).hexdigest()
        results += [
            ("data", f"{name}_files", len(files)),
            ("data", f"{name}_bytes", len(data[name])),
            ("data", f"{name}_sha256", digest),
        ]
    results += [
        ("data", "python_version", version),
        ("data", "heldout_windows", f"{len(heldout['inputs'])}x{heldout_len}"),
        ("data", "long_windows", f"{len(long['inputs'])}x{args.long_len}"),
    ]  # fmt: skip

    write_csv(out_dir / "bytes_results.csv", ["model", "key", "value"], results)
    write_csv(
        out_dir / "bytes_files.csv",
        ["split", "path", "bytes"],
        [(name, p, n) for name, files in split.items() for p, n in files],
    )
    write_csv(
        out_dir / "bytes_curve.csv",
        ["model", "step", "train_seconds", "train_bits_per_byte"],
        [tuple(row.values()) for row in curve],
    )
    write_csv(
        out_dir / "bytes_loss_by_position.csv",
        ["position", "vq_bits", "dense_bits"],
        [
            (i, round(float(v), 4), round(float(d), 4))
            for i, (v, d) in enumerate(zip(*by_position.values(), strict=True))
        ],
    )
    prompt = b"import os\n\n\ndef "
    for name, m in models.items():
        text = sample_text(configs[name], m["params"], prompt, 300, seed=0)
        print(f"--- {name} sample (p = {MODEL['p_nucleus']}) ---\n{text}\n")


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
