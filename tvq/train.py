"""Training a Transformer-VQ: optimizer, truncated backprop, data parallelism.

One *batch* holds B sequences of sequence_len tokens. The train step cuts it
into sequence_len / update_len *windows* and takes one optimizer step per
window, carrying the attention state from window to window with a stop
gradient (truncated backpropagation through time, as the reference's
`ops/train.py`). The step is one global program under `jax.jit`: the batch is
split over the "data" axis of a mesh and the parameters are replicated, so the
compiler inserts the all-reduce of the gradients and the codebook statistics.

A batch is a dict of [B, L] arrays: inputs (int tokens), targets (int next
tokens), loss_mask (1 where the language-model loss counts) and, optionally,
codebook_mask (1 where a key updates the codebook; default loss_mask, as in
the reference, where the mask marks real tokens). Other keys are ignored.

`train_step` starts every batch from a fresh attention state. When batch row
b of one batch continues the text of row b of the batch before (continuous
streams, as `tvq.corpus` makes them), `train_step_carry` takes the state the
previous batch ended with and returns the new one, so the model sees an
unbroken stream across batches too. Only attention="vq" carries state across
batches: its state has a fixed size, while a dense key/value buffer holds
one sequence.

Axes: B batch, L sequence_len, U update_len, S codes, H heads, G GAUs.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import TqdmWarning

from tvq.config import TransformerConfig
from tvq.model import Transformer, loss_fn
from tvq.parallel import make_data_mesh
from tvq.shapes import check_shape
from tvq.vq import VQSpec, sg

with warnings.catch_warnings():
    # In a notebook without ipywidgets tqdm.auto warns, then uses the text bar.
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

CODEBOOK_PARAMS = ("c_sum", "c_count")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adafactor", "lion")
TRAIN_FIELDS = (
    "optimizer",
    "lr_max",
    "lr_schedule",
    "wd_lam",
    "n_warmup_step",
    "n_max_step",
    "sequence_len",
    "update_len",
)


@struct.dataclass
class TrainState:
    """Parameters, optimizer state and the number of optimizer steps taken."""

    step: jax.Array
    params: Any
    opt_state: Any


def check_train_config(config: TransformerConfig) -> None:
    """ValueError naming the first training field that is missing or inconsistent."""
    for name in TRAIN_FIELDS:
        if getattr(config, name) is None:
            raise ValueError(f"tvq.train needs config.{name}, got None")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"config.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}"
        )
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(
            f"config.lr_schedule must be one of {SCHEDULES}, got {config.lr_schedule!r}"
        )
    if not 0 <= config.n_warmup_step <= config.n_max_step:
        raise ValueError(
            f"need 0 <= n_warmup_step <= n_max_step, got n_warmup_step="
            f"{config.n_warmup_step}, n_max_step={config.n_max_step}"
        )
    u, t = config.update_len, config.block_len
    if u <= 0 or u % t or config.sequence_len % u:
        raise ValueError(
            f"update_len={u} must be a positive multiple of block_len={t} "
            f"that divides sequence_len={config.sequence_len}"
        )


def lr_schedule(config: TransformerConfig) -> optax.Schedule:
    """Multiplier of lr_max: linear warm-up from 0, then decay to 0.1 at n_max_step.

    "cosine" and "linear" decay over n_max_step - n_warmup_step steps, as the
    reference's launch script; "constant" stays at 1 after the warm-up.
    """
    check_train_config(config)
    n_warm = config.n_warmup_step
    n_decay = max(config.n_max_step - n_warm, 1)
    warmup = optax.linear_schedule(0.0, 1.0, transition_steps=max(n_warm, 1))
    decay = {
        "cosine": optax.cosine_decay_schedule(1.0, n_decay, alpha=0.1),
        "linear": optax.linear_schedule(1.0, 0.1, n_decay),
        "constant": optax.constant_schedule(1.0),
    }[config.lr_schedule]
    return optax.join_schedules([warmup, decay], boundaries=[n_warm])


def param_labels(params) -> Any:
    """'codebook' for the c_sum / c_count leaves, 'main' for every other leaf."""

    def label(path, _):
        name = getattr(path[-1], "key", None)
        return "codebook" if name in CODEBOOK_PARAMS else "main"

    return jax.tree_util.tree_map_with_path(label, params)


def base_optimizer(config: TransformerConfig) -> optax.GradientTransformation:
    """The adaptive step of config.optimizer at learning rate lr_max, as the reference.

    "adamw": AdamW, b1 0.9, b2 0.98, eps 1e-9, first moment in float32, no
    built-in decay. "adafactor": Adafactor (Shazeer and Stern, 2018) with
    factored second moments for matrices whose two largest axes both have
    >= 128 entries, decay 1 - t^-0.8, update clipping at RMS 1, steps scaled
    by the parameter's RMS (at least 1e-3), no momentum, no built-in decay.
    "lion": Lion (Chen et al., 2023), b1 0.95, b2 0.98, momentum in bfloat16,
    no built-in decay. Each returns an update to add, already negated.
    """
    check_train_config(config)
    if config.optimizer == "adafactor":
        return optax.adafactor(
            config.lr_max,
            multiply_by_parameter_scale=True,
            clipping_threshold=1.0,
            weight_decay_rate=None,  # optax's decay is scaled by the rate
        )
    if config.optimizer == "lion":
        return optax.lion(
            config.lr_max, b1=0.95, b2=0.98, mu_dtype=jnp.bfloat16, weight_decay=0.0
        )
    return optax.adamw(
        config.lr_max,
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        mu_dtype=jnp.float32,
        weight_decay=0.0,  # optax's decay is scaled by the rate: see make_optimizer
    )


def make_optimizer(config: TransformerConfig) -> optax.GradientTransformation:
    """The reference's optimizer, with its hyperparameters from the config.

    Codebook statistics (c_sum, c_count): SGD with learning rate 1, so their
    step on the codebook loss is the EMA update. Everything else: clipping to
    global norm grad_clip (if set), `base_optimizer` (AdamW, Adafactor or Lion
    at lr_max), times `lr_schedule`, then decoupled weight decay
    p <- p - wd_lam p, not scaled by the learning rate, on every parameter that
    is not 1-D (gains, biases and u, v stay undecayed).
    """
    check_train_config(config)
    main = []
    if config.grad_clip is not None:
        main.append(optax.clip_by_global_norm(config.grad_clip))
    main.append(base_optimizer(config))
    main.append(optax.scale_by_schedule(lr_schedule(config)))
    if config.wd_lam > 0:
        main.append(
            optax.add_decayed_weights(
                -config.wd_lam, mask=lambda p: jax.tree.map(lambda x: x.ndim != 1, p)
            )
        )
    return optax.multi_transform(
        {"main": optax.chain(*main), "codebook": optax.sgd(1.0)}, param_labels
    )


def init_train_state(config: TransformerConfig, rng: jax.Array) -> TrainState:
    """Fresh parameters (from rng) and optimizer state for a training config."""
    check_train_config(config)
    model = Transformer(config)
    t = config.block_len
    inputs = jnp.zeros([1, t], jnp.int32)
    state = Transformer.initial_state(config, 1, t)
    spec = window_spec(config, jnp.ones([1, t], jnp.int32))
    init = jax.jit(lambda r: model.init({"params": r}, inputs, state, spec))
    params = init(rng)["params"]  # jit: one compile instead of op-by-op tracing
    opt_state = make_optimizer(config).init(params)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state)


def window_spec(config: TransformerConfig, codebook_mask: jax.Array) -> VQSpec:
    """VQSpec of one update window of a global program: n_device 1.

    Under jit the loss is the mean over the global batch, so the codebook
    statistics are already summed over every device (the `jit` form of the
    multi-device chapter); n_block_per_update = update_len / block_len.
    """
    return VQSpec(
        n_device=jnp.ones([1], jnp.int32),
        n_block_per_update=jnp.array([config.update_len // config.block_len]),
        loss_mask=codebook_mask,
    )


def check_batch(batch: dict, length: int | None = None) -> dict:
    """The [B, L] arrays of a batch, with codebook_mask filled in; ValueError if bad."""
    for name in ("inputs", "targets", "loss_mask"):
        if name not in batch:
            raise ValueError(f"batch needs key {name!r}, got keys {sorted(batch)}")
    dims = {} if length is None else {"L": length}
    out = {}
    for name in ("inputs", "targets", "loss_mask", "codebook_mask"):
        value = batch.get(name, batch["loss_mask"])
        dims = check_shape(f"batch[{name!r}]", value, "BL", dims)
        out[name] = value
    return out


def masked_accuracy(logprobs, targets, loss_mask) -> jax.Array:
    """[B, L] bool: the most likely token is the target, at counted positions."""
    return (jnp.argmax(logprobs, axis=-1) == targets) & (loss_mask != 0)


def carries_state(config: TransformerConfig) -> bool:
    """Whether training carries the attention state across batches (attention="vq")."""
    return config.attention == "vq"


def train_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
    rng: jax.Array,
) -> tuple[TrainState, dict]:
    """One batch from a fresh attention state: one optimizer step per window.

    Args:
      config: training config (is_train true).
      tx: `make_optimizer(config)`.
      state: TrainState before the batch.
      batch: inputs, targets, loss_mask (and codebook_mask), each [B, L].
      rng: dropout randomness (unused without dropout).

    Returns:
      (state after L / U optimizer steps, metrics): each metric is [L / U], one
      value per window: the `loss_fn` terms, accuracy at the counted positions,
      n_counted, lr_scale and, for attention="vq", the quantizer metrics.
    """
    check_train_config(config)
    b = check_batch(batch, config.sequence_len)["inputs"].shape[0]
    attn_state = Transformer.initial_state(config, b, config.sequence_len)
    state, _, metrics = _train_windows(config, tx, state, attn_state, batch, rng)
    return state, metrics


def train_step_carry(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    state: TrainState,
    attn_state,
    batch: dict,
    rng: jax.Array,
) -> tuple[TrainState, Any, dict]:
    """`train_step` from a given attention state; also returns the state after.

    Row b of the batch must continue the text that row b of `attn_state` has
    seen (start with `Transformer.initial_state(config, B)`). Gradients never
    cross a window boundary, nor a batch boundary. attention="vq" only (see
    `carries_state`): ValueError otherwise.

    Returns:
      (TrainState, attention state after the batch, metrics as `train_step`).
    """
    check_train_config(config)
    if not carries_state(config):
        raise ValueError(
            "carrying the attention state across batches needs attention='vq' "
            f"(a fixed-size state), got attention={config.attention!r}: its "
            "key/value buffer holds one sequence, so use train_step"
        )
    # The model checks the state against the batch (shapes, dtypes, structure).
    return _train_windows(config, tx, state, attn_state, batch, rng)


def _train_windows(config, tx, state, attn_state, batch, rng):
    """The scan over the update windows of one batch, from attn_state."""
    batch = check_batch(batch, config.sequence_len)
    b = batch["inputs"].shape[0]
    u = config.update_len
    n_window = config.sequence_len // u
    model = Transformer(config)
    schedule = lr_schedule(config)
    # [B, L] -> [L / U, B, U]: the scan runs over windows.
    windows = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(b, n_window, u), 1, 0), batch
    )
    rng_timeless, rng = jax.random.split(rng)

    def window_step(carry, window):
        train_state, attn_state, rng = carry
        rng, rng_ephemeral = jax.random.split(rng)
        spec = window_spec(config, window["codebook_mask"])

        def loss(params):
            out = model.apply(
                {"params": params},
                window["inputs"],
                attn_state,
                spec,
                rngs=dict(ephemeral=rng_ephemeral, timeless=rng_timeless),
            )
            terms = loss_fn(out, window["targets"], window["loss_mask"], config)
            return terms["loss"], (terms, out)

        grads, (terms, out) = jax.grad(loss, has_aux=True)(train_state.params)
        updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
        new_train_state = TrainState(
            step=train_state.step + 1,
            params=optax.apply_updates(train_state.params, updates),
            opt_state=opt_state,
        )
        correct = masked_accuracy(
            out["logprobs"], window["targets"], window["loss_mask"]
        )
        n_counted = jnp.sum(window["loss_mask"] != 0)
        metrics = dict(
            **terms,
            **out["metrics"],
            accuracy=jnp.sum(correct) / jnp.maximum(n_counted, 1),
            n_counted=n_counted,
            lr_scale=schedule(train_state.step),
        )
        new_attn_state = jax.tree.map(sg, out["attn_state"])
        return (new_train_state, new_attn_state, rng), metrics

    (state, attn_state, _), metrics = jax.lax.scan(
        window_step, (state, attn_state, rng), windows
    )
    return state, attn_state, metrics


def replicate(tree, mesh: Mesh):
    """Every leaf copied to every device of the mesh, from this process's copy."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        tree,
    )


def shard_batch(batch: dict, mesh: Mesh, axis: str = "data") -> dict:
    """Global arrays split over `axis` from this process's rows of the batch.

    With one process the rows are the whole batch; with several, each process
    passes its own consecutive block of rows (process i holds rows i B/n ..).
    """
    sharding = NamedSharding(mesh, P(axis))
    n_process = jax.process_count()
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        shape = (x.shape[0] * n_process, *x.shape[1:])
        if shape[0] % mesh.shape[axis]:
            raise ValueError(
                f"global batch B={shape[0]} (batch[{name!r}] shape {list(shape)}) "
                f"must be divisible by the {mesh.shape[axis]} devices of axis {axis!r}"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def state_sharding(state, mesh: Mesh, axis: str = "data"):
    """Shardings of an attention state: rows split over `axis`, scalars replicated."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, P(axis) if np.ndim(x) else P()), state
    )


def shard_state(state, mesh: Mesh, axis: str = "data"):
    """Global attention state from this process's rows (see `shard_batch`)."""
    n_process = jax.process_count()

    def put(x, sharding):
        x = np.asarray(x)
        if not x.ndim:
            return jax.make_array_from_process_local_data(sharding, x)
        shape = (x.shape[0] * n_process, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, state, state_sharding(state, mesh, axis))


def make_train_step(
    config: TransformerConfig, mesh: Mesh, axis: str = "data", carry: bool = False
):
    """`train_step` jit-compiled on a mesh: batch split over `axis`, rest replicated.

    Returns step(state, batch, rng_data) -> (state, metrics), taking global
    arrays laid out by `replicate` (state; rng_data, the uint32 key data of
    `jax.random.key_data`) and `shard_batch` (batch); the old state's buffers
    are donated. With carry=True it is `train_step_carry`:
    step(state, attn_state, batch, rng_data) -> (state, attn_state, metrics),
    the attention state split over `axis` by rows (`shard_state`).
    """
    check_train_config(config)
    tx = make_optimizer(config)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
    if carry:
        if not carries_state(config):
            raise ValueError(
                "carry=True needs attention='vq', got "
                f"attention={config.attention!r} (see train_step_carry)"
            )
        attn = state_sharding(Transformer.initial_state(config, 1), mesh, axis)

        def step_carry(state, attn_state, batch, rng_data):
            rng = jax.random.wrap_key_data(rng_data)
            return train_step_carry(config, tx, state, attn_state, batch, rng)

        return jax.jit(
            step_carry,
            in_shardings=(repl, attn, data, repl),
            out_shardings=(repl, attn, repl),
            donate_argnums=(0, 1),
        )

    def step(state, batch, rng_data):
        rng = jax.random.wrap_key_data(rng_data)
        return train_step(config, tx, state, batch, rng)

    return jax.jit(
        step,
        in_shardings=(repl, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def progress_bar(total: int | None, desc: str, enable: bool, unit: str = "it"):
    """A tqdm bar on stdout (widget in Jupyter with ipywidgets, else text).

    unit names what `update` counts; a unit other than "it" is shown with
    k/M prefixes (e.g. 12.3ktok/s).
    """
    return tqdm(
        total=total,
        desc=desc,
        disable=not enable,
        file=sys.stdout,
        mininterval=1.0,
        dynamic_ncols=True,
        unit=unit,
        unit_scale=unit != "it",
    )


def train(
    config: TransformerConfig,
    state: TrainState,
    batches: Iterable[dict],
    *,
    rng: jax.Array,
    mesh: Mesh | None = None,
    n_batch: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Train on every batch of `batches` (or the first n_batch); return the history.

    Args:
      config: training config.
      state: TrainState to start from (e.g. `init_train_state`).
      batches: iterable of dicts of [B, L] arrays (see the module docstring);
        with several processes, each process iterates over its own rows.
      rng: a `jax.random.key`, dropout randomness; batch i uses fold_in(rng, i).
      mesh: devices to train on (default: `tvq.make_data_mesh()`, all of them).
      n_batch: stop after this many batches (also sizes the progress bar).
      progress: show a progress bar.

    Returns:
      (final state, replicated over the mesh; history): each metric of
      `train_step` as a NumPy array with one entry per optimizer step (L / U
      per batch), plus "step", the optimizer step each entry was taken at
      (an empty dict when there was no batch).
    """
    mesh = make_data_mesh() if mesh is None else mesh
    step_fn = make_train_step(config, mesh)
    state = replicate(state, mesh)
    history: list[dict] = []
    with progress_bar(n_batch, desc, progress) as bar:
        for i, batch in enumerate(batches):
            if n_batch is not None and i >= n_batch:
                break
            rng_batch = jax.random.key_data(jax.random.fold_in(rng, i))
            step_before = int(state.step.addressable_data(0))
            state, metrics = step_fn(
                state, shard_batch(batch, mesh), replicate(rng_batch, mesh)
            )
            metrics = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), metrics)
            n_window = len(metrics["loss"])
            metrics["step"] = step_before + np.arange(n_window)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss'][-1]:.3f}", refresh=False)
    names = history[0] if history else {}
    return state, {k: np.concatenate([h[k] for h in history]) for k in names}


def eval_step(config: TransformerConfig, params, batch: dict, state=None) -> dict:
    """Log-likelihood and correctness at every position, without training.

    The whole sequence runs in one call with is_train false (no update windows
    are needed without gradients; the attention state still flows block to
    block), from `state` (default: a fresh one, with a dense key/value buffer
    of the batch's length). Returns nll [B, L] (negative log-probability of
    each target), correct [B, L] bool (argmax equals the target, at loss_mask
    positions) and attn_state, the state after the batch.
    """
    config = config.replace(is_train=False)
    batch = check_batch(batch)
    b, length = batch["inputs"].shape
    if state is None:
        state = Transformer.initial_state(config, b, length)
    out = Transformer(config).apply({"params": params}, batch["inputs"], state)
    logprobs = out["logprobs"]
    nll = -jnp.take_along_axis(logprobs, batch["targets"][..., None], axis=-1)[..., 0]
    return dict(
        nll=nll,
        correct=masked_accuracy(logprobs, batch["targets"], batch["loss_mask"]),
        attn_state=out["attn_state"],
    )


def evaluate(
    config: TransformerConfig,
    params,
    batches: Iterable[dict],
    *,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy over the counted positions of held-out batches.

    Runs `eval_step` (is_train false, so no codebook update and no dropout) on
    the mesh, batch split over "data" (with several processes, each passes its
    own rows). Returns loss (mean nll per counted position), accuracy and
    n_counted, over every batch.
    """
    mesh = make_data_mesh() if mesh is None else mesh
    params = replicate(params, mesh)

    def sums(params, batch):
        out = eval_step(config, params, batch)
        counted = batch["loss_mask"] != 0
        return jnp.stack(
            [
                jnp.sum(jnp.where(counted, out["nll"], 0.0)),
                jnp.sum(out["correct"]),
                jnp.sum(counted),
            ]
        ).astype(jnp.float32)

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(sums, in_shardings=(repl, data), out_shardings=repl)
    total = np.zeros(3)
    for batch in batches:
        batch = shard_batch(check_batch(batch), mesh)
        total += np.asarray(step(params, batch).addressable_data(0), np.float64)
    nll_sum, n_correct, n_counted = total
    if n_counted == 0:
        raise ValueError("evaluate needs at least one counted position, got none")
    return dict(
        loss=nll_sum / n_counted,
        accuracy=n_correct / n_counted,
        n_counted=int(n_counted),
    )


def code_counts(params) -> np.ndarray:
    """[G, H, S] EMA code counts (c_count) of every GAU, in parameter order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    counts = [
        np.asarray(x)
        for path, x in leaves
        if getattr(path[-1], "key", None) == "c_count"
    ]
    if not counts:
        raise ValueError("params have no c_count leaves (attention='dense'?)")
    return np.stack(counts)
