"""tvq.checkpoint: exact resume, retention, crashes during a save, bad checkpoints.

The exact-resume reference is the same run without a break; retention is
checked against the rule computed by hand; a crash is a save killed in a
subprocess, or the temporary directory such a crash leaves.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tvq
from tvq import checkpoint as ck
from tvq import corpus as tc
from tvq import train as tt

TINY = dict(
    n_vocab=256, d_model=16, d_k=8, d_v=16, n_head=1, n_code=8, n_layer=1,
    block_len=8, mem_len=8, sequence_len=32, update_len=16, global_batch_size=8,
    agg_cache=True, grad_thru_cache=True, pe_abs=False, pe_lam=10_000,
    c_beta=1e-4, c_gamma=0.99, e_tie=False, e_preln=False, e_scale=1.0,
    p_dropemb=0.0, p_dropsin=0.0, p_dropres=0.0, p_droplyr=0.0, p_nucleus=0.9,
    is_train=True, grad_clip=1.0, optimizer="adamw", lr_max=1e-2,
    lr_schedule="cosine", wd_lam=1e-3, n_warmup_step=2, n_max_step=40,
)  # fmt: skip


def tiny_config(**overrides) -> tvq.TransformerConfig:
    return tvq.TransformerConfig.create(**{**TINY, **overrides})


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def max_diff(a, b) -> float:
    a, b = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert len(a) == len(b) > 0
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"\n"]
    for i in range(12):
        (root / f"f{i}.txt").write_bytes(b" ".join(rng.choice(words, 120)))
    return tc.build_corpus([root], tmp_path_factory.mktemp("corpus") / "c", 0.2)


# ------------------------------------------------------------------- config


def test_config_json_round_trip():
    config = tiny_config(dtype="bfloat16", attention="dense", p_nucleus=None)
    fields = ck.config_to_json(config)
    assert fields["dtype"] == "bfloat16" and fields["param_dtype"] == "float32"
    assert "w_init" not in fields
    assert ck.config_from_json(fields) == config
    with pytest.raises(ValueError, match=r"does not know: \['d_fancy'\]"):
        ck.config_from_json(dict(fields, d_fancy=3))
    assert ck.config_differences(config, config.replace(d_k=4, lr_max=0.5)) == [
        "d_k: saved 8, given 4",
        "lr_max: saved 0.01, given 0.5",
    ]


# ------------------------------------------------------------ exact resume


def run_batches(config, mesh, corpus, state, attn, first, last, rng):
    """Train on batches first..last-1 from (state, attn); carry the state."""
    step = tt.make_train_step(config, mesh, carry=True)
    b, length = config.global_batch_size, config.sequence_len
    for i in range(first, last):
        batch = tc.train_batch(corpus, i, batch_size=b, sequence_len=length, seed=0)
        if tc.starts_epoch(corpus, i, b, length):
            attn = tt.shard_state(tvq.Transformer.initial_state(config, b), mesh)
        key = tt.replicate(jax.random.key_data(jax.random.fold_in(rng, i)), mesh)
        state, attn, _ = step(state, attn, tt.shard_batch(batch, mesh), key)
    return state, attn


def test_resume_is_exact(corpus, tmp_path):
    """2N batches straight equal N, save, restore in a new manager, N more."""
    config = tiny_config()
    mesh = tvq.make_data_mesh(8)
    n = 6
    assert tc.batches_per_epoch(corpus, 8, 32) > n  # the state carries throughout
    rng = jax.random.key(1)
    start = tt.replicate(tt.init_train_state(config, jax.random.key(0)), mesh)
    straight, _ = run_batches(config, mesh, corpus, start, None, 0, 2 * n, rng)

    start = tt.replicate(tt.init_train_state(config, jax.random.key(0)), mesh)
    half, attn = run_batches(config, mesh, corpus, start, None, 0, n, rng)
    with ck.RunCheckpoints(tmp_path / "run") as run:
        run.save(
            config=config, train_state=half,
            rng=tt.replicate(jax.random.key_data(rng), mesh), data_position=n,
            attn_state=attn, heldout_loss=1.5, extra=dict(note="half"),
        )  # fmt: skip
    with ck.RunCheckpoints(tmp_path / "run") as run:
        got = run.restore(config, mesh=mesh)
    assert got.data_position == n and got.heldout_loss == 1.5
    assert got.meta["note"] == "half"
    assert int(got.train_state.step.addressable_data(0)) == n * 2
    np.testing.assert_array_equal(
        jax.random.key_data(got.rng), jax.random.key_data(rng)
    )
    # Laid out on the mesh: parameters replicated, state rows split.
    leaf = jax.tree.leaves(got.train_state.params)[0]
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
    assert leaf.sharding.is_fully_replicated
    assert got.attn_state[0][0]["xlcache"]["k_hat"].sharding.spec == P("data")
    assert max_diff(got.attn_state, attn) == 0.0
    resumed, _ = run_batches(
        config, mesh, corpus, got.train_state, got.attn_state, n, 2 * n, got.rng
    )
    err = max_diff(resumed.params, straight.params)
    print(f"max |params resumed - straight| after {4 * n} steps: {err:.1e}")
    assert err <= 1e-6
    assert max_diff(resumed.opt_state, straight.opt_state) <= 1e-6
    # The second half moved the parameters: resuming from scratch would fail.
    assert max_diff(half.params, straight.params) > 1e-3


# --------------------------------------------------------------- retention


def test_keeps_the_last_n_and_the_best(tmp_path):
    config = tiny_config(attention="dense")
    state = tt.init_train_state(config, jax.random.key(0))
    key = jax.random.key_data(jax.random.key(0))
    losses = [3.0, 1.0, 2.0, None, 4.0, 2.5, None]
    with ck.RunCheckpoints(tmp_path, keep=2) as run:
        for i, loss in enumerate(losses, start=1):
            state = state.replace(step=jnp.asarray(i, jnp.int32))
            run.save(config=config, train_state=state, rng=key, data_position=i,
                     heldout_loss=loss)  # fmt: skip
    steps = list(range(1, len(losses) + 1))
    scored = {s: v for s, v in zip(steps, losses, strict=True) if v is not None}
    best = min(scored, key=scored.get)
    with ck.RunCheckpoints(tmp_path, read_only=True) as reopened:
        assert reopened.steps() == sorted({*steps[-2:], best}) == [2, 6, 7]
        assert reopened.best_step() == best
    config_back, params = ck.load_params(tmp_path)  # the best step
    assert config_back == config
    assert ck.load_params(tmp_path, step=7)[1].keys() == params.keys()


# --------------------------------------------------- crashes during a save


def saved_run(tmp_path, steps=(1, 2)):
    config = tiny_config(attention="dense")
    state = tt.init_train_state(config, jax.random.key(0))
    with ck.RunCheckpoints(tmp_path) as run:
        for s in steps:
            state = state.replace(step=jnp.asarray(s, jnp.int32))
            key = jax.random.key_data(jax.random.key(s))
            run.save(config=config, train_state=state, rng=key, data_position=s)
    return config, state


def test_a_save_cut_short_is_ignored(tmp_path):
    """The temporary directory a crash leaves is not a checkpoint."""
    config, state = saved_run(tmp_path)
    partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "2", partial)
    shutil.rmtree(partial / "params")
    with ck.RunCheckpoints(tmp_path, read_only=True) as run:
        assert run.steps() == [1, 2]
        got = run.restore(config)
    assert got.data_position == 2
    assert max_diff(got.train_state.params, state.params) == 0.0
    # The next save clears the leftover.
    with ck.RunCheckpoints(tmp_path) as run:
        key = jax.random.key_data(jax.random.key(0))
        later = state.replace(step=state.step + 1)
        run.save(config=config, train_state=later, rng=key, data_position=3)
    assert not partial.exists()
    with ck.RunCheckpoints(tmp_path, read_only=True) as run:
        assert run.steps() == [1, 2, 3]


KILLED_SAVER = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
import tvq
from tvq import checkpoint as ck, train as tt
config = tvq.TransformerConfig.create(**{fields!r})
state = tt.init_train_state(config, jax.random.key(0))
run = ck.RunCheckpoints(sys.argv[1], async_save=False)
key = jax.random.key_data(jax.random.key(0))
for step in range(50):
    start = time.perf_counter()
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    run.save(config=config, train_state=state, rng=key, data_position=step)
    print("saved", time.perf_counter() - start, flush=True)
"""


def test_a_killed_save_loses_nothing(tmp_path):
    """SIGKILL halfway through the third save (timed by the second)."""
    # Large enough that a save takes a while: d_model 1024, n_vocab 4096.
    fields = dict(TINY, d_model=1024, n_vocab=4096, attention="dense")
    code = textwrap.dedent(KILLED_SAVER.format(fields=fields))
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    seconds = []
    for line in proc.stdout:
        seconds.append(float(line.split()[1]))
        if len(seconds) == 2:
            time.sleep(seconds[-1] / 2)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with ck.RunCheckpoints(tmp_path / "run", read_only=True) as run:
        steps = run.steps()
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if "tmp" in p.name]
    print(
        f"saves took {seconds} s; after the kill: steps {steps}, temporary {leftovers}"
    )
    assert steps[:2] == [0, 1] and steps[-1] <= 2, steps
    config = tvq.TransformerConfig.create(**fields)
    fresh = tt.init_train_state(config, jax.random.key(0))
    for s in steps:
        with ck.RunCheckpoints(tmp_path / "run", read_only=True) as run:
            got = run.restore(config, step=s)
        assert max_diff(got.train_state.params, fresh.params) == 0.0
        assert got.data_position == s


# ---------------------------------------------------------- bad checkpoints


def test_other_config_is_named(tmp_path):
    config, _ = saved_run(tmp_path)
    with (
        ck.RunCheckpoints(tmp_path, read_only=True) as run,
        pytest.raises(
            ValueError,
            match=r"(?s)does not match:\n  d_model: saved 16, given 32\n  lr_max:",
        ),
    ):
        run.restore(config.replace(d_model=32, lr_max=0.5))


def test_other_shapes_are_named(tmp_path):
    small = tiny_config(attention="dense")
    large = small.replace(d_model=24)
    params = tt.init_train_state(large, jax.random.key(0)).params
    ck.save_params(tmp_path / "export", small, params)  # a config that lies
    with pytest.raises(
        ValueError,
        match=re.escape(
            "params.embs: checkpoint [256, 24] float32, expected [256, 16]"
        ),
    ):
        ck.load_params(tmp_path / "export")


def test_missing_and_truncated_items(tmp_path):
    config, _ = saved_run(tmp_path)

    def restore(config, step):
        with ck.RunCheckpoints(tmp_path, read_only=True) as run:
            return run.restore(config, step=step)

    shutil.rmtree(tmp_path / "2" / "train")
    with pytest.raises(
        ValueError, match=r"is incomplete: missing item\(s\) \['train'\]"
    ):
        restore(config, step=2)
    data_files = [
        p
        for p in (tmp_path / "1" / "params").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"item 'params' could not be read"):
        restore(config, step=1)
    with pytest.raises(
        ValueError, match=r"no checkpoint of step 5 .* saved steps: \[1, 2\]"
    ):
        restore(config, step=5)
    with pytest.raises(ValueError, match="no checkpoint at .*nowhere: not a directory"):
        ck.load_params(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="exists: export to a new directory"):
        ck.save_params(tmp_path, config, {})


def test_attn_state_only_with_vq(tmp_path):
    config = tiny_config()
    state = tt.init_train_state(config, jax.random.key(0))
    with (
        ck.RunCheckpoints(tmp_path) as run,
        pytest.raises(ValueError, match="attn_state must be given exactly when"),
    ):
        key = jax.random.key_data(jax.random.key(0))
        run.save(config=config, train_state=state, rng=key, data_position=0)
