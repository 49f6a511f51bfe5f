"""Mutation check: plant one-line bugs in tvq/ and see which tests catch them.

Each mutant replaces one exact snippet of one file under tvq/ (the snippet
must occur exactly once, else the mutant is reported STALE: the code moved
on and the mutant needs updating) and lists the test files that should catch
it. For every mutant the repository is copied to a temporary directory, the
snippet replaced there, and `python -m pytest -x -q -p no:cacheprovider`
run on the listed test files with the copy as working directory, so that
`import tvq` resolves to the mutated copy (checked before the first mutant).
The working tree is never modified.

    .venv/bin/python experiments/mutation.py                  # every mutant
    .venv/bin/python experiments/mutation.py --only M01 M07   # some
    .venv/bin/python experiments/mutation.py --stale-only     # no tests run
    .venv/bin/python experiments/mutation.py --rev 1e448e4 \\
        --out experiments/mutation_before.md                  # an old commit

--rev takes the repository as of a git commit (its test files: listed files
missing there are skipped and named in the table). The result is a Markdown
table (mutant, file, description, tests run, result, the test that caught
it, seconds) written to --out and printed, ready to paste into a note.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]

# Test files by topic; each mutant runs the new, targeted files first.
LOSS = ["tests/test_loss_terms.py"]
DROPOUT = ["tests/test_dropout.py"]
SCHEDULES = ["tests/test_schedules.py"]
GEN_RNG = ["tests/test_generate_rng.py"]
NUCLEUS = ["tests/test_nucleus_boundary.py"]
STOPS = ["tests/test_grad_stops.py"]
DEFAULTS = ["tests/test_batch_defaults.py"]
TRAIN = ["tests/test_train.py"]
MODEL = ["tests/test_model.py", "tests/test_layer_reference.py"]
VQ = ["tests/test_vq.py", "tests/test_vq_properties.py"]
ATTN = ["tests/test_attention.py"]
GEN = ["tests/test_generate.py", "tests/test_sample_nucleus.py"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    description: str
    old: str
    new: str
    tests: list
    equivalent: str = ""  # why no test can catch it, for a known equivalent


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- loss
    M("M01", "tvq/model.py", "loss: c_beta dropped from the commitment term",
      "loss=l_lm + config.c_beta * l_commit + l_codebook,",
      "loss=l_lm + l_commit + l_codebook,",
      LOSS + TRAIN + MODEL),
    M("M02", "tvq/model.py", "loss: c_beta also weighs the codebook term",
      "loss=l_lm + config.c_beta * l_commit + l_codebook,",
      "loss=l_lm + config.c_beta * (l_commit + l_codebook),",
      LOSS + TRAIN + MODEL),
    M("M03", "tvq/model.py", "loss: LM term per counted token, not per position",
      "l_lm = jnp.mean(mask * nll)",
      "l_lm = jnp.sum(mask * nll) / jnp.maximum(jnp.sum(mask), 1.0)",
      LOSS + TRAIN + MODEL),
    M("M04", "tvq/model.py", "loss: LM term ignores loss_mask",
      "l_lm = jnp.mean(mask * nll)",
      "l_lm = jnp.mean(nll)",
      LOSS + TRAIN + MODEL),
    M("M05", "tvq/model.py", "model: l_commit averaged over layers, not summed",
      'l_commit=sum(a["l_commit"] for a in aux),',
      'l_commit=sum(a["l_commit"] for a in aux) / len(aux),',
      LOSS + TRAIN + MODEL),
    M("M06", "tvq/model.py", "layer: l_commit counts the first GAU twice",
      'l_commit=out1["l_commit"] + out2["l_commit"],',
      'l_commit=out1["l_commit"] + out1["l_commit"],',
      LOSS + TRAIN + MODEL),
    M("M07", "tvq/vq.py", "VQ: l_commit averaged over heads, not summed",
      "l_commit = jnp.mean(jnp.sum(mask * errs2, axis=1))",
      "l_commit = jnp.mean(mask * errs2)",
      LOSS + VQ + MODEL + TRAIN),
    M("M08", "tvq/vq.py", "VQ: l_commit ignores loss_mask",
      "l_commit = jnp.mean(jnp.sum(mask * errs2, axis=1))",
      "l_commit = jnp.mean(jnp.sum(errs2, axis=1))",
      LOSS + VQ + MODEL + TRAIN),
    # ------------------------------------------------------------- dropout
    M("M09", "tvq/model.py", "dropemb on in evaluation (deterministic flipped)",
      'cfg.p_dropemb, deterministic=not cfg.is_train, rng_collection="ephemeral"',
      'cfg.p_dropemb, deterministic=cfg.is_train, rng_collection="ephemeral"',
      DROPOUT + MODEL + TRAIN + GEN),
    M("M10", "tvq/model.py", "dropemb draws from the timeless collection",
      'cfg.p_dropemb, deterministic=not cfg.is_train, rng_collection="ephemeral"',
      'cfg.p_dropemb, deterministic=not cfg.is_train, rng_collection="timeless"',
      DROPOUT + MODEL + TRAIN),
    M("M11", "tvq/model.py", "LayerDrop draws per position, not per sequence",
      "broadcast_dims=(1, 2),",
      "broadcast_dims=(2,),",
      DROPOUT + MODEL + TRAIN),
    M("M12", "tvq/model.py", "LayerDrop draws from the ephemeral collection",
      'broadcast_dims=(1, 2),\n            rng_collection="timeless",',
      'broadcast_dims=(1, 2),\n            rng_collection="ephemeral",',
      DROPOUT + MODEL + TRAIN),
    M("M13", "tvq/model.py", "LayerDrop uses p_dropres",
      "self.droplyr1 = nn.Dropout(cfg.p_droplyr, **drop)",
      "self.droplyr1 = nn.Dropout(cfg.p_dropres, **drop)",
      DROPOUT + MODEL + TRAIN),
    M("M14", "tvq/layers.py", "dropsin draws from the ephemeral collection",
      'cfg.p_dropsin, deterministic=not train, rng_collection="timeless"',
      'cfg.p_dropsin, deterministic=not train, rng_collection="ephemeral"',
      DROPOUT + MODEL + TRAIN),
    M("M15", "tvq/layers.py", "dropres draws from the timeless collection",
      'cfg.p_dropres, deterministic=not train, rng_collection="ephemeral"',
      'cfg.p_dropres, deterministic=not train, rng_collection="timeless"',
      DROPOUT + MODEL + TRAIN),
    M("M16", "tvq/layers.py", "dropres on in evaluation (deterministic flipped)",
      'cfg.p_dropres, deterministic=not train, rng_collection="ephemeral"',
      'cfg.p_dropres, deterministic=train, rng_collection="ephemeral"',
      DROPOUT + MODEL + TRAIN + GEN),
    M("M17", "tvq/layers.py", "dropsin uses p_dropres",
      "self.dropsin = nn.Dropout(\n            cfg.p_dropsin,",
      "self.dropsin = nn.Dropout(\n            cfg.p_dropres,",
      DROPOUT + MODEL + TRAIN),
    M("M18", "tvq/train.py", "train step: timeless key redrawn every window",
      "rngs=dict(ephemeral=rng_ephemeral, timeless=rng_timeless),",
      "rngs=dict(ephemeral=rng_ephemeral, timeless=rng_ephemeral),",
      DROPOUT + TRAIN),
    M("M19", "tvq/train.py", "train step: ephemeral key not advanced per window",
      "rng, rng_ephemeral = jax.random.split(rng)",
      "_, rng_ephemeral = jax.random.split(rng)",
      DROPOUT + TRAIN),
    M("M20", "tvq/train.py", "train: every batch gets the same key",
      "rng_batch = jax.random.key_data(jax.random.fold_in(rng, i))",
      "rng_batch = jax.random.key_data(rng)",
      DROPOUT + TRAIN),
    M("M21", "tvq/train.py", "eval_step keeps a training config (is_train)",
      "config = config.replace(is_train=False)\n    batch = check_batch(batch)",
      "config = config.replace(is_train=config.is_train)\n"
      "    batch = check_batch(batch)",
      DROPOUT + TRAIN),
    M("M22", "tvq/sample.py", "decode step keeps a training config (is_train)",
      "return config.replace(block_len=1, is_train=False)",
      "return config.replace(block_len=1)",
      DROPOUT + GEN_RNG + GEN),
    # ----------------------------------------------------------- schedules
    M("M23", "tvq/train.py", "schedule: 'constant' holds 0.1, not 1",
      '"constant": optax.constant_schedule(1.0),',
      '"constant": optax.constant_schedule(0.1),',
      SCHEDULES + TRAIN),
    M("M24", "tvq/train.py", "schedule: linear decays to 0, not 0.1",
      '"linear": optax.linear_schedule(1.0, 0.1, n_decay),',
      '"linear": optax.linear_schedule(1.0, 0.0, n_decay),',
      SCHEDULES + TRAIN),
    M("M25", "tvq/train.py", "schedule: decay starts one step late",
      "boundaries=[n_warm])",
      "boundaries=[n_warm + 1])",
      SCHEDULES + TRAIN),
    M("M26", "tvq/train.py", "schedule: warm-up one step longer",
      "transition_steps=max(n_warm, 1))",
      "transition_steps=max(n_warm + 1, 1))",
      SCHEDULES + TRAIN),
    M("M27", "tvq/train.py", "weight decay skips scalars (ndim > 1, not != 1)",
      "lambda x: x.ndim != 1",
      "lambda x: x.ndim > 1",
      SCHEDULES + TRAIN),
    # --------------------------------------------------- batch field default
    M("M28", "tvq/train.py", "codebook_mask defaults to all ones",
      'value = batch.get(name, batch["loss_mask"])',
      'value = batch.get(name, jnp.ones_like(batch["loss_mask"]))',
      DEFAULTS + TRAIN),
    M("M29", "tvq/train.py", "codebook statistics count loss_mask, not codebook_mask",
      'spec = window_spec(config, window["codebook_mask"])',
      'spec = window_spec(config, window["loss_mask"])',
      DEFAULTS + TRAIN),
    # ------------------------------------------------------ gradient stops
    M("M30", "tvq/attention.py", "grad_thru_cache=False: no stop between blocks",
      "carry = jax.tree.map(sg, carry)",
      "carry = carry",
      STOPS + ATTN + MODEL),
    M("M31", "tvq/layers.py", "GAU ignores grad_thru_cache inside a call",
      "grad_thru_cache=cfg.grad_thru_cache,",
      "grad_thru_cache=True,",
      STOPS + MODEL),
    M("M32", "tvq/layers.py", "GAU: returned state keeps its gradient",
      "state = jax.tree.map(jax.lax.stop_gradient, state)",
      "state = state",
      STOPS + MODEL),
    # ------------------------------------------------------------ sampling
    M("M33", "tvq/sample.py", "decode: every step draws with the same key",
      "jax.random.fold_in(rng, i)",
      "rng",
      GEN_RNG + GEN),
    M("M34", "tvq/sample.py", "decode: step i draws with fold_in(rng, i + 1)",
      "jax.random.fold_in(rng, i)",
      "jax.random.fold_in(rng, i + 1)",
      GEN_RNG + GEN),
    M("M35", "tvq/sample.py", "nucleus: a token after a mass of exactly p stays",
      "keep_ranked = (before < p)",
      "keep_ranked = (before <= p)",
      NUCLEUS + GEN),
    M("M36", "tvq/sample.py", "nucleus: ties go to the larger index",
      "order = jnp.argsort(-probs, axis=-1, stable=True)",
      "order = jnp.flip(jnp.argsort(probs, axis=-1, stable=True), axis=-1)",
      NUCLEUS + GEN),
    # ------------------------------------------------- quantizer, attention
    M("M37", "tvq/vq.py", "EMA: gamma and 1 - gamma swapped for c_count",
      "c_count_tgt = c_gamma * c_count + (1.0 - c_gamma) * c_count_hat",
      "c_count_tgt = (1.0 - c_gamma) * c_count + c_gamma * c_count_hat",
      VQ + TRAIN),
    M("M38", "tvq/model.py", "statistics not rescaled by the blocks in a call",
      "n_block_per_update=vq_spec.n_block_per_update / n_block,",
      "n_block_per_update=vq_spec.n_block_per_update,",
      DEFAULTS + TRAIN + MODEL),
    M("M39", "tvq/attention.py", "window: a key at distance exactly M hidden",
      "exists = j >= jnp.maximum(mem_len - pos_offset, 0)",
      "exists = j > jnp.maximum(mem_len - pos_offset, 0)",
      ATTN + MODEL),
    M("M40", "tvq/attention.py", "aggcache: log(1 + n_s) instead of log n_s",
      "jnp.where(lower > 0, jnp.log(jnp.maximum(lower, 1.0)), -MASK)",
      "jnp.where(lower > 0, jnp.log1p(lower), -MASK)",
      ATTN + MODEL),
    M("M41", "tvq/model.py", "absolute positions restart at 0 every call",
      "pe = sinusoids(p, cfg.d_model, cfg.pe_lam, start=offset)",
      "pe = sinusoids(p, cfg.d_model, cfg.pe_lam, start=0)",
      MODEL + GEN),
    # An equivalent mutant, kept to show the check reports one as such: each
    # window's gradient is taken with the carried state as a constant input.
    M("M42", "tvq/train.py", "train step: carried state without stop_gradient",
      'new_attn_state = jax.tree.map(sg, out["attn_state"])',
      'new_attn_state = out["attn_state"]',
      TRAIN + STOPS,
      equivalent="the state enters each window's loss as a constant input, "
      "so no gradient could reach the previous window through it"),
]  # fmt: skip


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str  # caught, SURVIVED, equivalent, STALE, timeout, no tests
    caught_by: str
    tests_run: list
    missing: list
    seconds: float


def snapshot(rev: str | None, dest: Path) -> None:
    """The repository's files (tracked and untracked, not ignored) or `rev`."""
    dest.mkdir(parents=True)
    if rev is not None:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Replace the snippet in the copy; a reason string if the mutant is stale."""
    path = tree / mutant.file
    if not path.is_file():
        return f"{mutant.file} not found"
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        return f"snippet found {count} times in {mutant.file}"
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def environment(cache: Path | None = None) -> dict:
    """The caller's environment; JAX's persistent compilation cache in `cache`.

    The cache is keyed by the compiled program, so a mutant only recompiles
    what its change reaches; everything else is read back.
    """
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)  # `import tvq` must find the copy's tvq
    if cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


RUNNING: set = set()  # pytest processes in flight, killed on an interrupt
RUNNING_LOCK = threading.Lock()


def kill(proc: subprocess.Popen) -> None:
    """Kill pytest and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_tests(python, tests, tree, timeout, cache) -> tuple[int, str]:
    """pytest on `tests` in `tree`: (exit code, output)."""
    proc = subprocess.Popen(
        [python, *PYTEST, *tests], cwd=tree, env=environment(cache),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    with RUNNING_LOCK:
        RUNNING.add(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise
    finally:
        with RUNNING_LOCK:
            RUNNING.discard(proc)
    return proc.returncode, output


def first_failure(output: str) -> str:
    """The first FAILED or ERROR test in pytest's short summary."""
    for line in output.splitlines():
        found = re.match(r"(FAILED|ERROR) (\S+)", line)
        if found:
            return found.group(2)
    errors = [ln for ln in output.splitlines() if re.search(r"\w+Error\b", ln)]
    return f"(no test named; {errors[-1].strip()[:80]})" if errors else "(see log)"


def run_mutant(
    mutant: Mutant,
    pristine: Path,
    python: str,
    timeout: float,
    stale_only: bool,
    logs: Path | None = None,
    cache: Path | None = None,
) -> Result:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mut-{mutant.id}-") as tmp:
        tree = Path(tmp) / "repo"
        shutil.copytree(pristine, tree, symlinks=True)
        stale = apply(mutant, tree)
        tests = [t for t in mutant.tests if (tree / t).is_file()]
        missing = [t for t in mutant.tests if t not in tests]
        if stale is not None:
            return Result(mutant, "STALE", stale, [], missing, 0.0)
        if stale_only:
            return Result(mutant, "not run", "", tests, missing, 0.0)
        if not tests:
            return Result(mutant, "no tests", "", [], missing, 0.0)
        try:
            returncode, output = run_tests(python, tests, tree, timeout, cache)
        except subprocess.TimeoutExpired:
            seconds = time.perf_counter() - start
            return Result(
                mutant, "timeout", f"> {timeout:.0f} s", tests, missing, seconds
            )
        seconds = time.perf_counter() - start
        if logs is not None:
            log = f"$ {' '.join([python, *PYTEST, *tests])}\n{output}"
            (logs / f"{mutant.id}.log").write_text(log)
        if returncode == 0 and mutant.equivalent:
            return Result(
                mutant, "equivalent", mutant.equivalent, tests, missing, seconds
            )
        if returncode == 0:
            return Result(mutant, "SURVIVED", "", tests, missing, seconds)
        if returncode == 5:
            return Result(mutant, "no tests", "collected none", tests, missing, seconds)
        return Result(mutant, "caught", first_failure(output), tests, missing, seconds)


def check_copy_is_tested(pristine: Path, python: str) -> None:
    """`import tvq` in a copy resolves there, and a broken copy fails pytest."""
    with tempfile.TemporaryDirectory(prefix="mut-check-") as tmp:
        tree = Path(tmp) / "repo"
        shutil.copytree(pristine, tree, symlinks=True)
        where = subprocess.run(
            [python, "-c", "import tvq; print(tvq.__file__)"], cwd=tree,
            env=environment(), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not Path(where).resolve().is_relative_to(tree.resolve()):
            sys.exit(f"import tvq in the copy found {where}, not the copy: aborting")
        with open(tree / "tvq" / "__init__.py", "a") as init:
            init.write('\nraise ImportError("mutation canary")\n')
        proc = subprocess.run(
            [python, *PYTEST, "tests/test_config.py"], cwd=tree, env=environment(),
            capture_output=True, text=True,
        )  # fmt: skip
        if "mutation canary" not in proc.stdout + proc.stderr:
            sys.exit("pytest in a copy whose tvq cannot import did not fail: aborting")


def table(results: list, title: str) -> str:
    counts = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [
        f"### {title}",
        "",
        f"{len(results)} mutants: {summary}.",
        "",
        "| mutant | file | description | tests run | result | caught by | s |",
        "| --- | --- | --- | --- | --- | --- | ---: |",
    ]
    for r in results:
        tests = ", ".join(Path(t).stem.removeprefix("test_") for t in r.tests_run)
        if r.missing:
            names = ", ".join(Path(t).stem.removeprefix("test_") for t in r.missing)
            tests += f" (absent: {names})"
        caught_by = r.caught_by.replace("tests/", "").replace("|", "\\|")
        lines.append(
            f"| {r.mutant.id} | {r.mutant.file.removeprefix('tvq/')} | "
            f"{r.mutant.description} | {tests} | {r.status} | {caught_by} | "
            f"{r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="mutant ids to run")
    parser.add_argument("--rev", help="git commit to copy instead of the work tree")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--title", default=None, help="heading of the table")
    parser.add_argument("--jobs", type=int, default=1, help="mutants in parallel")
    parser.add_argument("--timeout", type=float, default=3600, help="s per mutant")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--stale-only", action="store_true", help="apply each mutant, run no tests"
    )
    parser.add_argument("--list", action="store_true", help="print the mutants")
    parser.add_argument("--logs", type=Path, help="save each mutant's pytest output")
    parser.add_argument(
        "--compile-cache",
        type=Path,
        help="JAX compilation cache shared by the mutants (default: a fresh "
        "temporary one; 'none' for no cache)",
    )
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    if args.only and len(mutants) != len(set(args.only)):
        sys.exit(f"unknown mutant ids: {set(args.only) - {m.id for m in MUTANTS}}")
    if args.list:
        for m in mutants:
            print(f"{m.id}  {m.file}: {m.description}\n  - {m.old}\n  + {m.new}")
        return
    # SIGTERM unwinds like Ctrl-C, so running pytest process groups are killed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="mut-pristine-") as tmp:
        pristine = Path(tmp) / "repo"
        cache = args.compile_cache or Path(tmp) / "jax-cache"
        cache = None if str(cache) == "none" else cache
        snapshot(args.rev, pristine)
        if not args.stale_only:
            check_copy_is_tested(pristine, args.python)
        results = []
        pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
        futures = [
            pool.submit(
                run_mutant, m, pristine, args.python, args.timeout, args.stale_only,
                args.logs, cache,
            )
            for m in mutants
        ]  # fmt: skip
        try:
            for future in futures:
                result = future.result()
                results.append(result)
                print(
                    f"{result.mutant.id}: {result.status} {result.caught_by} "
                    f"({result.seconds:.0f} s)",
                    flush=True,
                )
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            with RUNNING_LOCK:
                for proc in list(RUNNING):
                    kill(proc)
            raise
        pool.shutdown()
    title = args.title or f"Mutation check of {args.rev or 'the work tree'}"
    text = table(results, title)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
