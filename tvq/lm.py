"""Byte-level language models on your own text: train, evaluate, sample.

    python -m tvq.lm train  --data PATH... --workdir DIR [--preset cpu]
                            [--set key=value ...] [--dtype bfloat16]
    python -m tvq.lm eval   --workdir DIR --data PATH...
    python -m tvq.lm sample --workdir DIR --prompt TEXT
                            [--temperature T] [--top-k K] [--p P]

Data (`tvq.corpus`): folders, glob patterns or files, one document per file,
each preceded by a NUL byte; a held-out split by a hash of each file's path;
batch rows that are continuous streams, so the attention state carries from
batch to batch (attention="vq"). The corpus is built once under
DIR/corpus/.

Training: a preset (`PRESETS`) and `--set` overrides make the
TransformerConfig; n_max_step sets the run's length and its schedule (the
run takes whole batches of sequence_len / update_len steps each, so it may
end up to one batch past n_max_step). The
batch is split over every device of every process (`tvq.make_data_mesh`).
Every `--eval-every` batches the model is evaluated on the held-out split
(at most `--eval-bytes` bytes of it) and saved (`tvq.checkpoint`, in
DIR/checkpoints: the last `--keep` and the best by held-out loss). Each
batch appends a line to DIR/metrics.jsonl (step, train and held-out bits per
byte, learning-rate scale, tokens per second). Running the same command
again resumes from the latest checkpoint; Ctrl-C saves one and exits with
code 130, and the resumed run reaches the same parameters as a run never
interrupted.

Evaluation streams each held-out file from its first byte, the state carried
block to block over the whole file for attention="vq"; dense attention starts
a fresh key/value buffer every sequence_len bytes, the context it was trained
with. It prints `bits per byte: X.XXXX`.

Sampling prefixes the prompt with the separator (a document starts there)
and stops at the separator (the document ends) unless told otherwise.

Several processes: `--processes N` starts N on this machine (with
`--cpu-devices K` CPU devices each, to try it without accelerators); on
several machines, run the same command on each with `--coordinator HOST:PORT
--num-processes N --process-id I`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tvq.checkpoint import RunCheckpoints, load_params, read_config, run_step_path
from tvq.cluster import join_cluster, run_local_processes, set_cpu_devices
from tvq.config import INITIALIZERS, TransformerConfig
from tvq.corpus import (
    SEPARATOR,
    load_corpus,
    starts_epoch,
    stream_batches,
    train_batch,
)
from tvq.model import Transformer
from tvq.parallel import make_data_mesh
from tvq.sample import generate
from tvq.train import (
    carries_state,
    check_train_config,
    eval_step,
    init_train_state,
    make_train_step,
    progress_bar,
    replicate,
    shard_batch,
    shard_state,
    state_sharding,
)

LOG2E = 1.0 / math.log(2.0)
INTERRUPTED = 130  # the exit code of a shell command stopped by Ctrl-C

# Every preset: bytes, untied output head (the reference's enwik8 head), no
# absolute positions, AdamW with cosine decay.
BYTE_MODEL = dict(
    n_vocab=256,
    pe_abs=False,
    pe_lam=100_000,
    agg_cache=True,
    grad_thru_cache=True,
    e_tie=False,
    e_preln=False,
    e_scale=1.0,
    c_beta=1e-4,
    c_gamma=0.99,
    p_dropemb=0.0,
    optimizer="adamw",
    lr_schedule="cosine",
    p_nucleus=0.9,
    attention="vq",
    is_train=True,
)
PRESETS = {
    # 576k parameters; minutes on 2 CPU cores.
    "cpu": dict(
        BYTE_MODEL,
        d_model=128,
        d_k=64,
        d_v=256,
        n_head=1,
        n_code=64,
        n_layer=2,
        block_len=64,
        mem_len=64,
        sequence_len=512,
        update_len=256,
        global_batch_size=8,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        grad_clip=1.0,
        lr_max=3e-3,
        wd_lam=0.0,
        n_warmup_step=50,
        n_max_step=600,
    ),
    # The reference's enwik8 run (its scripts/lm_enwik8.sh, with T = 8192 and
    # L = M = S = 512 as its optimized branch's config_enwik8.py): 188M
    # parameters, for accelerators.
    "enwik8": dict(
        BYTE_MODEL,
        d_model=768,
        d_k=128,
        d_v=1536,
        d_ff=0,
        n_head=1,
        n_code=512,
        n_layer=24,
        block_len=512,
        mem_len=512,
        sequence_len=8192,
        update_len=2048,
        global_batch_size=128,
        p_dropsin=0.2,
        p_dropres=0.5,
        p_droplyr=0.3,
        grad_clip=0.1,
        lr_max=4e-4,
        wd_lam=2e-4,
        n_warmup_step=10_000,
        n_max_step=125_000,
    ),
}
# Batches between held-out evaluations (and saves), and the held-out bytes
# each evaluation reads (None: all of them).
RUN_DEFAULTS = {
    "cpu": dict(eval_every=50, eval_bytes=1 << 16),
    "enwik8": dict(eval_every=250, eval_bytes=None),
}


# ------------------------------------------------------------------ config


def _field_types() -> dict[str, str]:
    return {
        f.name: str(f.type)
        for f in dataclasses.fields(TransformerConfig)
        if f.name not in INITIALIZERS
    }


def parse_value(name: str, text: str, kind: str) -> Any:
    """The value of config field `name` (type `kind`) written as `text`."""
    optional = "None" in kind
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if name in ("dtype", "param_dtype"):
            return jnp.dtype(text).name
        if name == "e_scale" or kind.startswith("float"):
            return float(text)
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("bool"):
            truth = {"1": True, "true": True, "yes": True}
            truth |= {"0": False, "false": False, "no": False}
            return truth[text.lower()]
    except (ValueError, TypeError, KeyError):
        raise ValueError(
            f"--set {name}={text}: not a valid {kind.replace(' | None', '')}"
            + (" (or none)" if optional else "")
        ) from None
    return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """{field: value} from ["key=value", ...]; ValueError naming the known fields."""
    types = _field_types()
    out = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"--set needs key=value, got {pair!r}")
        if name not in types:
            raise ValueError(
                f"--set {name}: unknown config field; known: {', '.join(sorted(types))}"
            )
        out[name] = parse_value(name, text.strip(), types[name])
    return out


def make_config(preset: str, overrides: dict | None = None, dtype: str | None = None):
    """The training TransformerConfig of a preset, with overrides and dtype."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    fields = dict(PRESETS[preset], **(overrides or {}))
    if dtype is not None:
        fields["dtype"] = parse_value("dtype", dtype, "Any")
    if fields.get("n_vocab") is None or fields["n_vocab"] < 256:
        raise ValueError(
            f"byte models need n_vocab >= 256, got {fields.get('n_vocab')}"
        )
    config = TransformerConfig.create(**fields)
    check_train_config(config)
    return config


# ------------------------------------------------------------- evaluation


def evaluate_bits(config, params, corpus, documents, mesh, batch_size: int) -> dict:
    """Held-out bits per byte of `documents`, each streamed from its first byte.

    attention="vq" carries its state over whole documents; dense attention
    starts a fresh buffer every sequence_len bytes. Returns bits_per_byte and
    n_bytes, summed over every process's rows.
    """
    config = config.replace(is_train=False)
    chunk = config.sequence_len
    carry = carries_state(config)
    rows = process_rows(batch_size)
    fresh_local = Transformer.initial_state(
        config, rows.stop - rows.start, None if carry else chunk
    )
    step = _eval_sums(config, mesh, rows.stop - rows.start)
    total = np.zeros(2)
    state = None
    for first, batch in stream_batches(
        corpus, documents, batch_size=batch_size, chunk_len=chunk, rows=rows
    ):
        if first or not carry:
            state = shard_state(fresh_local, mesh)
        out, state = step(params, shard_batch(batch, mesh), state)
        total += np.asarray(out.addressable_data(0), np.float64)
    nll, count = total
    return dict(bits_per_byte=nll / count * LOG2E, n_bytes=int(count))


@functools.lru_cache(maxsize=8)
def _eval_sums(config, mesh, local_b: int):
    """Jitted (params, batch, state) -> ([nll sum, count], state) on the mesh."""
    carry = carries_state(config)
    fresh = Transformer.initial_state(
        config, local_b, None if carry else config.sequence_len
    )
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    attn = state_sharding(fresh, mesh)

    def sums(params, batch, state):
        out = eval_step(config, params, batch, state)
        counted = batch["loss_mask"] != 0
        nll = jnp.sum(jnp.where(counted, out["nll"], 0.0), dtype=jnp.float32)
        return jnp.stack([nll, jnp.sum(counted, dtype=jnp.float32)]), out["attn_state"]

    return jax.jit(sums, in_shardings=(repl, data, attn), out_shardings=(repl, attn))


def process_rows(batch_size: int) -> slice:
    """This process's rows of a global batch; ValueError unless they split evenly."""
    n, i = jax.process_count(), jax.process_index()
    if batch_size % n:
        raise ValueError(
            f"global_batch_size={batch_size} must be divisible by the {n} processes"
        )
    per = batch_size // n
    return slice(i * per, (i + 1) * per)


# ---------------------------------------------------------------- training


@dataclasses.dataclass
class TrainOptions:
    """Everything `train` needs; the command line's flags."""

    data: list[str]
    workdir: str
    preset: str = "cpu"
    overrides: dict = dataclasses.field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    heldout_fraction: float = 0.05
    eval_every: int | None = None
    eval_bytes: int | None = None  # None: the preset's default; 0: all
    keep: int = 3
    progress: bool = True


class _StopFlag:
    """Set by the first Ctrl-C; the second one interrupts as usual."""

    def __init__(self):
        self.raised = False

    def __call__(self, signum, frame):
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _say(
            "\ninterrupted: saving a checkpoint after this batch (Ctrl-C again to quit)"
        )

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def _say(*args, **kwargs) -> None:
    """print on process 0 only."""
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def _agree(flag: bool) -> bool:
    """True when any process's flag is set (every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written after the checkpoint resumed from)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(options: TrainOptions) -> dict:
    """Train (or resume) the run in options.workdir; returns a summary dict.

    The summary holds step, data_position, heldout_bits_per_byte (of the
    last evaluation, None if none), best_step and interrupted. See the module
    docstring for what is written where.
    """
    config = make_config(options.preset, options.overrides, options.dtype)
    run_defaults = RUN_DEFAULTS.get(options.preset, RUN_DEFAULTS["cpu"])
    eval_every = options.eval_every or run_defaults["eval_every"]
    eval_bytes = options.eval_bytes
    if eval_bytes is None:
        eval_bytes = run_defaults["eval_bytes"]
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    b, length = config.global_batch_size, config.sequence_len
    n_window = length // config.update_len
    n_batch = math.ceil(config.n_max_step / n_window)
    mesh = make_data_mesh()
    if b % mesh.size:
        raise ValueError(
            f"global_batch_size={b} must be divisible by the {mesh.size} devices"
        )
    rows = process_rows(b)

    corpus = _shared_corpus(options.data, workdir / "corpus", options.heldout_fraction)
    _say(corpus.summary())
    heldout = corpus.heldout_documents(eval_bytes or None)
    run_id = dict(
        seed=options.seed,
        corpus_sha256=corpus.digest,
        heldout_fraction=options.heldout_fraction,
    )
    checkpoints = RunCheckpoints(workdir / "checkpoints", keep=options.keep)
    carry = carries_state(config)
    metrics_path = workdir / "metrics.jsonl"
    start = _start(config, checkpoints, mesh, run_id, metrics_path)
    state, attn_state, rng_train, position, last_bits = start
    if position == 0 and checkpoints.latest_step() is None:
        n_param = sum(x.size for x in jax.tree.leaves(state.params))
        _say(f"new run: {n_param:,} parameters, {n_batch} batches of {b} x {length}")
    step_fn = make_train_step(config, mesh, carry=carry)

    def fresh_attn():
        return shard_state(
            Transformer.initial_state(config, rows.stop - rows.start), mesh
        )

    def save(heldout_loss=None):
        checkpoints.save(
            config=config,
            train_state=state,
            rng=replicate(jax.random.key_data(rng_train), mesh),
            data_position=position,
            attn_state=attn_state,
            heldout_loss=heldout_loss,
            extra=run_id,
        )

    interrupted = False
    log = open(metrics_path, "a") if jax.process_index() == 0 else None
    bar = progress_bar(
        n_batch * b * length,
        "train",
        options.progress and jax.process_index() == 0,
        unit="tok",
    )
    bar.update(position * b * length)
    try:
        with _StopFlag() as stop:
            while position < n_batch:
                batch = train_batch(
                    corpus,
                    position,
                    batch_size=b,
                    sequence_len=length,
                    seed=options.seed,
                    rows=rows,
                )
                batch = shard_batch(batch, mesh)
                key = jax.random.key_data(jax.random.fold_in(rng_train, position))
                key = replicate(key, mesh)
                t0 = time.perf_counter()
                if carry:
                    if attn_state is None or starts_epoch(corpus, position, b, length):
                        attn_state = fresh_attn()
                    state, attn_state, metrics = step_fn(state, attn_state, batch, key)
                else:
                    state, metrics = step_fn(state, batch, key)
                bits = np.asarray(metrics["l_lm_per_token"].addressable_data(0)) * LOG2E
                lr = np.asarray(metrics["lr_scale"].addressable_data(0))
                seconds = time.perf_counter() - t0
                position += 1
                step = int(state.step.addressable_data(0))
                record = dict(
                    step=step,
                    batch=position,
                    train_bits_per_byte=round(float(bits.mean()), 5),
                    lr_scale=round(float(lr[-1]), 6),
                    tokens_per_second=round(b * length / seconds, 1),
                )
                evaluate_now = position % eval_every == 0 or position == n_batch
                if evaluate_now:
                    params = state.params
                    result = evaluate_bits(config, params, corpus, heldout, mesh, b)
                    last_bits = result["bits_per_byte"]
                    record["heldout_bits_per_byte"] = round(last_bits, 5)
                    save(heldout_loss=last_bits / LOG2E)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                postfix = dict(step=step, bpb=f"{record['train_bits_per_byte']:.3f}")
                if last_bits is not None:
                    postfix["heldout"] = f"{last_bits:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(b * length)
                if _agree(stop.raised) and position < n_batch:
                    if not evaluate_now:
                        save()
                    interrupted = True
                    break
        checkpoints.wait()
        best = checkpoints.best_step()
    finally:
        bar.close()
        if log:
            log.close()
        checkpoints.close()  # waits for a save in progress
    step = int(state.step.addressable_data(0))
    if interrupted:
        _say(f"saved step {step}; run the same command again to resume")
    else:
        heldout_text = "none" if last_bits is None else f"{last_bits:.4f}"
        _say(
            f"done: step {step}, held-out bits per byte {heldout_text}, "
            f"best checkpoint: step {best}"
        )
    return dict(
        step=step,
        data_position=position,
        heldout_bits_per_byte=last_bits,
        best_step=best,
        interrupted=interrupted,
    )


def _start(config, checkpoints, mesh, run_id: dict, metrics_path: Path):
    """(state, attn_state, rng, data position, held-out bits) to train from.

    The latest checkpoint when there is one (ValueError if it was made with
    another config, seed, corpus or held-out fraction), else a new state from
    run_id["seed"]. Metric lines written after the checkpoint are dropped.
    """
    rng_init, rng_train = jax.random.split(jax.random.key(run_id["seed"]))
    if checkpoints.latest_step() is None:
        if jax.process_index() == 0:
            _trim_metrics(metrics_path, 0)  # from a run stopped before its first save
        state = replicate(init_train_state(config, rng_init), mesh)
        return state, None, rng_train, 0, None
    try:
        restored = checkpoints.restore(config, mesh=mesh)
    except ValueError as e:
        raise ValueError(
            f"{e}\nresume with the same --preset, --set and --dtype, "
            f"or train in a new --workdir"
        ) from e
    differs = [
        f"{k}: saved {restored.meta.get(k)!r}, now {v!r}"
        for k, v in run_id.items()
        if restored.meta.get(k) != v
    ]
    if differs:
        raise ValueError(
            f"{checkpoints.directory} holds a run on other data or settings ("
            + "; ".join(differs)
            + "): resume with the same ones, or train in a new --workdir"
        )
    step = int(restored.train_state.step.addressable_data(0))
    _say(f"resuming from step {step}")
    if jax.process_index() == 0:
        _trim_metrics(metrics_path, step)
    bits = restored.heldout_loss
    return (
        restored.train_state,
        restored.attn_state,
        restored.rng,
        restored.data_position,
        None if bits is None else bits * LOG2E,
    )


def _shared_corpus(data, cache_dir: Path, fraction: float):
    """The corpus, built by process 0 first when processes share a file system."""
    if jax.process_count() == 1:
        return load_corpus(data, cache_dir, fraction)
    if jax.process_index() == 0:
        corpus = load_corpus(data, cache_dir, fraction)
    multihost_utils.sync_global_devices("tvq.lm corpus built")
    if jax.process_index() != 0:
        corpus = load_corpus(data, cache_dir, fraction)
    return corpus


# ----------------------------------------------------------- eval, sample


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """A workdir's checkpoints folder, or the path itself (a checkpoint or export)."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def evaluate(
    workdir: str | os.PathLike,
    data: list[str],
    *,
    step: int | None = None,
    heldout_fraction: float = 0.05,
    batch_size: int | None = None,
) -> dict:
    """Held-out bits per byte of a trained model on the held-out split of `data`.

    The model is the run's best checkpoint (lowest held-out loss; `step` to
    choose another) from `workdir`, or an export. batch_size rows are
    evaluated at once (default config.global_batch_size).
    """
    mesh = make_data_mesh()
    config, params = load_params(checkpoint_dir(workdir), step=step, mesh=mesh)
    corpus = load_corpus(data, Path(workdir) / "corpus", heldout_fraction)
    documents = corpus.heldout_documents()
    b = batch_size or config.global_batch_size or mesh.size
    if b % mesh.size:
        b = math.ceil(b / mesh.size) * mesh.size
    result = evaluate_bits(config, params, corpus, documents, mesh, b)
    result["n_documents"] = len(documents)
    return result


def sample_text(
    path: str | os.PathLike,
    prompt: str | bytes = b"",
    *,
    max_new_bytes: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    p: float | None = None,
    stop: int | None = 0,
    seed: int = 0,
    step: int | None = None,
) -> bytes:
    """Continue `prompt` with a model from a checkpoint directory; the new bytes.

    Args:
      path: a workdir of `train`, its checkpoints folder, one checkpoint, or
        an export (`tvq.checkpoint.save_params`).
      prompt: text (UTF-8) or bytes; the separator is put before it, as
        before every document in training.
      max_new_bytes: at most this many new bytes.
      temperature, top_k, p: see `tvq.sample.sampling_logprobs` (p defaults
        to config.p_nucleus, else 1).
      stop: the byte that ends the text (default 0, the separator: the end of
        a document), not returned; None to always sample max_new_bytes.
      seed: the sampling rng's seed.
      step: which checkpoint of a run (default: the best).
    """
    config, params = load_params(checkpoint_dir(path), step=step)
    config = config.replace(is_train=False)
    if isinstance(prompt, str):
        prompt = prompt.encode()
    tokens = np.frombuffer(bytes([SEPARATOR]) + prompt, np.uint8).astype(np.int32)
    if p is None:
        p = config.p_nucleus if config.p_nucleus is not None else 1.0
    out = generate(
        config,
        params,
        tokens[None],
        max_new_tokens=max_new_bytes,
        rng=jax.random.key(seed),
        p_nucleus=p,
        temperature=temperature,
        top_k=top_k,
        stop_token=stop,
    )
    new = np.asarray(out[0, len(tokens) :])
    if stop is not None and (hits := np.flatnonzero(new == stop)).size:
        new = new[: hits[0]]
    return bytes(new.astype(np.uint8))


# ------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tvq.lm",
        description="Byte-level Transformer-VQ on your own text.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def devices(p):
        p.add_argument(
            "--cpu-devices",
            type=int,
            metavar="K",
            help="show K CPU devices to JAX (to try data parallelism on a CPU)",
        )

    t = sub.add_parser("train", help="train, or resume, a run in --workdir")
    t.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="folders, glob patterns or files",
    )
    t.add_argument("--workdir", required=True, metavar="DIR")
    t.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TransformerConfig field (repeatable)",
    )
    t.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype (parameters stay float32)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--heldout-fraction", type=float, default=0.05)
    t.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="batches between evaluations and saves",
    )
    t.add_argument(
        "--eval-bytes",
        type=int,
        metavar="N",
        help="held-out bytes per evaluation (0: all; default: the preset's)",
    )
    t.add_argument("--keep", type=int, default=3, help="latest checkpoints kept")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="start N processes on this machine",
    )
    t.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="join a cluster (also --num-processes, --process-id)",
    )
    t.add_argument("--num-processes", type=int)
    t.add_argument("--process-id", type=int)
    devices(t)

    e = sub.add_parser("eval", help="held-out bits per byte")
    e.add_argument("--workdir", required=True, metavar="DIR")
    e.add_argument("--data", nargs="+", required=True, metavar="PATH")
    e.add_argument("--step", type=int, help="checkpoint step (default: the best)")
    e.add_argument("--heldout-fraction", type=float, default=0.05)
    e.add_argument("--batch-size", type=int)
    devices(e)

    s = sub.add_parser("sample", help="continue a prompt")
    s.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="a run's workdir, a checkpoint or an export",
    )
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-bytes", type=int, default=256)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int)
    s.add_argument("--p", type=float, help="nucleus mass (default config.p_nucleus)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--stop",
        type=int,
        default=0,
        metavar="BYTE",
        help="stop at this byte (default 0: end of document)",
    )
    s.add_argument("--no-stop", action="store_true")
    s.add_argument("--step", type=int)
    devices(s)
    return parser


def _child_argv(argv: list[str], n_process: int, process_id: int, port: int) -> list:
    """This command for process process_id of a local cluster."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [
        sys.executable,
        "-m",
        "tvq.lm",
        *out,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n_process),
        "--process-id",
        str(process_id),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "train" and args.processes > 1 and args.coordinator is None:
        codes = run_local_processes(
            lambda i, port: _child_argv(argv, args.processes, i, port),
            args.processes,
            Path(args.workdir) / "logs",
            echo_first=True,
            accept=(0, INTERRUPTED),
        )
        return INTERRUPTED if INTERRUPTED in codes else 0

    if args.cpu_devices:
        set_cpu_devices(args.cpu_devices)
    if getattr(args, "coordinator", None):
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("--coordinator needs --num-processes and --process-id")
        join_cluster(args.coordinator, args.num_processes, args.process_id)
    try:
        if args.command == "train":
            summary = train(
                TrainOptions(
                    data=args.data,
                    workdir=args.workdir,
                    preset=args.preset,
                    overrides=parse_overrides(args.set),
                    dtype=args.dtype,
                    seed=args.seed,
                    heldout_fraction=args.heldout_fraction,
                    eval_every=args.eval_every,
                    eval_bytes=args.eval_bytes,
                    keep=args.keep,
                    progress=not args.no_progress,
                )
            )
            return INTERRUPTED if summary["interrupted"] else 0
        if args.command == "eval":
            result = evaluate(
                args.workdir,
                args.data,
                step=args.step,
                heldout_fraction=args.heldout_fraction,
                batch_size=args.batch_size,
            )
            reset = (
                ""
                if _is_vq(args.workdir, args.step)
                else (", dense: key/value buffer reset every sequence_len bytes")
            )
            n_doc = result["n_documents"]
            print(
                f"held out: {n_doc} document{'s' * (n_doc != 1)}, "
                f"{result['n_bytes']:,} bytes{reset}"
            )
            print(f"bits per byte: {result['bits_per_byte']:.4f}")
            return 0
        text = sample_text(
            args.workdir,
            args.prompt,
            max_new_bytes=args.max_new_bytes,
            temperature=args.temperature,
            top_k=args.top_k,
            p=args.p,
            stop=None if args.no_stop else args.stop,
            seed=args.seed,
            step=args.step,
        )
        sys.stdout.write(args.prompt + text.decode("utf-8", "replace") + "\n")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _is_vq(path, step) -> bool:
    directory = checkpoint_dir(path)
    if not (directory / "config").is_dir():
        directory = run_step_path(directory, step)
    return read_config(directory).attention == "vq"


if __name__ == "__main__":
    sys.exit(main())
