"""Checkpoints of training runs and exported models, on orbax-checkpoint.

A *checkpoint* is one directory holding up to four items, each written by
orbax (arrays in its OCDBT/TensorStore format, JSON as JSON):

  params   the model's parameters;
  train    step, opt_state (the optimizer state), rng (the key data of the
           training rng) and, for attention="vq", attn_state: the attention
           state the last batch ended with, rows over the global batch;
  meta     JSON: data_position (batches consumed so far), heldout_loss
           (nats per byte, or null) and anything else the trainer records;
  config   JSON: the TransformerConfig (`config_to_json`).

`RunCheckpoints` keeps the checkpoints of one run in a directory, one
subdirectory per optimizer step, through orbax's CheckpointManager: the last
`keep` steps and the step with the lowest held-out loss survive. Orbax writes
each step into a temporary directory and renames it when complete, so a crash
during a save leaves the steps saved before it intact, and the temporary
directory is never taken for a checkpoint (the next save deletes it).

An *exported model* (`save_params`) is a checkpoint with only params and
config: what sampling and evaluation need, a few MB for a small model.
`load_params` reads one from an export, a single checkpoint or a run's
directory (its best step, else its latest).

Everything that does not fit raises a ValueError naming what differs: a
config other than the one given (field by field), arrays of other shapes or
dtypes (path by path), a missing item, or files orbax cannot read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from tvq.config import INITIALIZERS, TransformerConfig
from tvq.model import Transformer
from tvq.train import TrainState, carries_state, init_train_state, state_sharding

ITEMS = ("params", "train", "meta", "config")
FORMAT_VERSION = 1


class _QuietOrbax(logging.Filter):
    """Drop orbax's info and warning records (read-only mode, metrics not given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_QuietOrbax())


# --------------------------------------------------------------------- config


def config_to_json(config: TransformerConfig) -> dict:
    """Every field of the config as JSON values: dtypes by name, no initializers.

    The initializers are the fixed objects of `TransformerConfig.create`, so
    `config_from_json` re-creates them.
    """
    out = {}
    for field in dataclasses.fields(config):
        if field.name in INITIALIZERS:
            continue
        value = getattr(config, field.name)
        if field.name in ("param_dtype", "dtype"):
            value = jnp.dtype(value).name
        elif isinstance(value, np.generic):
            value = value.item()
        out[field.name] = value
    return out


def config_from_json(fields: dict) -> TransformerConfig:
    """The config `config_to_json` wrote; ValueError on fields tvq does not know."""
    known = {f.name for f in dataclasses.fields(TransformerConfig)} - set(INITIALIZERS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"the saved config has fields this version of tvq does not know: "
            f"{unknown} (known: {sorted(known)})"
        )
    return TransformerConfig.create(**fields)


def config_differences(saved: TransformerConfig, given: TransformerConfig) -> list:
    """'field: saved X, given Y' for every field where two configs differ."""
    a, b = config_to_json(saved), config_to_json(given)
    return [
        f"{name}: saved {a[name]!r}, given {b[name]!r}"
        for name in a
        if not _same(a[name], b[name])
    ]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


# ------------------------------------------------------------- tree checks


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree) -> dict[str, tuple]:
    """{'a.b.0': (shape, dtype name)} for every array-like leaf of a tree."""

    def is_leaf(x):
        return hasattr(x, "shape") and hasattr(x, "dtype")

    return {
        ".".join(_key_name(k) for k in path): (
            tuple(leaf.shape),
            jnp.dtype(leaf.dtype).name,
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
        if is_leaf(leaf)
    }


def tree_differences(saved, expected, name: str) -> list[str]:
    """What differs between a checkpoint's array metadata and the arrays expected."""
    have, want = _flat_shapes(saved), _flat_shapes(expected)
    out = [f"{name}.{k}: missing from the checkpoint" for k in want if k not in have]
    out += [
        f"{name}.{k}: in the checkpoint, not expected" for k in have if k not in want
    ]
    for k in want:
        if k in have and have[k] != want[k]:
            (s1, d1), (s2, d2) = have[k], want[k]
            out.append(
                f"{name}.{k}: checkpoint {list(s1)} {d1}, expected {list(s2)} {d2}"
            )
    return out


def _raise_differences(where: str, differences: list[str]) -> None:
    if differences:
        shown = "\n  ".join(differences[:12])
        more = len(differences) - 12
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(f"{where} does not match:\n  {shown}{tail}")


# ----------------------------------------------------------- abstract trees


def _abstract(tree, sharding):
    """ShapeDtypeStructs of a tree's leaves, with one sharding or a tree of them."""
    if not isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            tree,
            sharding,
        )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def _replicated(mesh: Mesh | None):
    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return NamedSharding(mesh, P())


def abstract_train_state(config: TransformerConfig) -> TrainState:
    """The shapes and dtypes of `init_train_state(config, ...)`, computed lazily."""
    return jax.eval_shape(lambda: init_train_state(config, jax.random.key(0)))


def abstract_params(config: TransformerConfig):
    """The shapes and dtypes of the model's parameters, computed lazily."""
    config = config.replace(is_train=False)
    t = config.block_len
    inputs = jnp.zeros([1, t], jnp.int32)

    def init():
        state = Transformer.initial_state(config, 1, t)
        return Transformer(config).init(jax.random.key(0), inputs, state)["params"]

    return jax.eval_shape(init)


def _abstract_rng():
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))


# ------------------------------------------------------- reading one step


def _read_json_item(path: Path, item: str) -> dict:
    _check_items(path, [item])
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            return checkpointer.restore(path / item)
    except Exception as e:  # orbax raises many kinds; all mean unreadable
        raise ValueError(
            f"checkpoint {path}: item {item!r} could not be read ({e})"
        ) from e


def _check_items(path: Path, items) -> None:
    if not path.is_dir():
        raise ValueError(f"no checkpoint at {path}: not a directory")
    missing = [item for item in items if not (path / item).is_dir()]
    if missing:
        present = sorted(p.name for p in path.iterdir())
        raise ValueError(
            f"checkpoint {path} is incomplete: missing item(s) {missing}, "
            f"found {present}"
        )


def _item_metadata(path: Path, item: str):
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(path / item).tree
    except Exception as e:
        raise ValueError(
            f"checkpoint {path}: item {item!r} could not be read ({e})"
        ) from e
    finally:
        handler.close()


def read_config(path: str | Path) -> TransformerConfig:
    """The TransformerConfig saved in the checkpoint (or export) at `path`."""
    path = Path(path)
    _check_items(path, ["config"])
    return config_from_json(_read_json_item(path, "config"))


def _restore_items(path: Path, targets: dict) -> dict:
    """Restore items {name: abstract tree} after checking their shapes."""
    _check_items(path, list(targets))
    out = {}
    for item, target in targets.items():
        metadata = _item_metadata(path, item)
        _raise_differences(
            f"checkpoint {path}, item {item!r}",
            tree_differences(metadata, target, item),
        )
        try:
            with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
                out[item] = checkpointer.restore(
                    path / item, args=ocp.args.StandardRestore(target)
                )
        except Exception as e:
            raise ValueError(
                f"checkpoint {path}: item {item!r} could not be read ({e})"
            ) from e
    return out


def _check_config(path: Path, config: TransformerConfig | None) -> TransformerConfig:
    saved = read_config(path)
    if config is not None:
        _raise_differences(
            f"the config saved in checkpoint {path}",
            config_differences(saved, config),
        )
    return saved


# ---------------------------------------------------------- exported models


def save_params(path: str | Path, config: TransformerConfig, params) -> Path:
    """Export a model (params and config) to a new directory `path`.

    ValueError if `path` exists. The params are saved as they are (convert
    them first to store another dtype).
    """
    path = Path(path).absolute()
    if path.exists():
        raise ValueError(f"{path} exists: export to a new directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                config=ocp.args.JsonSave(config_to_json(config)),
            ),
        )
    return path


def load_params(
    path: str | Path, step: int | None = None, mesh: Mesh | None = None
) -> tuple[TransformerConfig, Any]:
    """(config, params) of an export, a checkpoint or a run's checkpoint directory.

    Args:
      path: a directory written by `save_params`, one checkpoint (a step
        directory of `RunCheckpoints`), or a `RunCheckpoints` directory.
      step: with a run's directory, the step to load (default: the best by
        held-out loss, else the latest).
      mesh: replicate the params over this mesh (default: the first local
        device).

    Returns:
      (config as saved, params as jax Arrays).
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise ValueError(f"no checkpoint at {path}: not a directory")
    if not (path / "config").is_dir():
        path = run_step_path(path, step)
    elif step is not None:
        raise ValueError(f"{path} is a single checkpoint: step={step} needs a run's")
    _check_items(path, ["params", "config"])
    config = read_config(path)
    abstract = _abstract(abstract_params(config), _replicated(mesh))
    return config, _restore_items(path, {"params": abstract})["params"]


# --------------------------------------------------------- training runs


def run_step_path(directory: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step` in a run's directory (default: best, else latest)."""
    with RunCheckpoints(directory, read_only=True) as run:
        chosen = run.best_step() if step is None else step
        if chosen is None:
            raise ValueError(
                f"{run.directory} holds no checkpoint: neither an export (params, "
                f"config) nor a run directory with saved steps"
            )
        return run.step_path(chosen)


@dataclasses.dataclass
class Restored:
    """What `RunCheckpoints.restore` returns."""

    config: TransformerConfig
    train_state: TrainState
    rng: jax.Array  # a jax.random key, on this process
    attn_state: Any  # None unless attention="vq"
    data_position: int
    heldout_loss: float | None
    meta: dict


def _heldout_loss(metrics) -> float:
    return metrics["heldout_loss"]


class RunCheckpoints:
    """The checkpoints of one training run, in `directory` (one per step).

    Args:
      directory: created if missing (unless read_only).
      keep: how many of the latest checkpoints survive each save.
      keep_best: also keep the checkpoint of lowest held-out loss (saves
        without a held-out loss do not compete).
      async_save: return from `save` once the arrays are copied to the host
        and write in the background (`wait` or `close` to finish).
      read_only: never create, write or delete anything.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 3,
        keep_best: bool = True,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise ValueError(f"no checkpoint directory at {self.directory}")
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_heldout_loss,
                    reverse=True,  # sorted from high to low loss; keep the last
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=_heldout_loss if keep_best else None,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS, options=options
        )

    # -- queries
    def steps(self) -> list[int]:
        """Saved steps, oldest first (a save in progress is not one)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the lowest held-out loss; the latest if none recorded one."""
        best = self._manager.best_step()
        return self.latest_step() if best is None else best

    def step_path(self, step: int) -> Path:
        if step not in self.steps():
            raise ValueError(
                f"no checkpoint of step {step} in {self.directory}; saved steps: "
                f"{self.steps()}"
            )
        return self.directory / str(step)

    # -- saving
    def save(
        self,
        *,
        config: TransformerConfig,
        train_state: TrainState,
        rng: jax.Array,
        data_position: int,
        attn_state=None,
        heldout_loss: float | None = None,
        extra: dict | None = None,
    ) -> int:
        """Save a checkpoint at step train_state.step; returns that step.

        Every process of a multi-process run must call it with its global
        arrays (replicated, or rows over the mesh for attn_state); rng is the
        key data (`jax.random.key_data`), replicated like the parameters.
        """
        if carries_state(config) != (attn_state is not None):
            raise ValueError(
                "attn_state must be given exactly when attention='vq' carries it "
                f"(attention={config.attention!r}, attn_state given: "
                f"{attn_state is not None})"
            )
        step = int(np.asarray(_local(train_state.step)))
        train = dict(step=train_state.step, opt_state=train_state.opt_state, rng=rng)
        if attn_state is not None:
            train["attn_state"] = attn_state
        meta = dict(
            format=FORMAT_VERSION,
            step=step,
            data_position=int(data_position),
            heldout_loss=None if heldout_loss is None else float(heldout_loss),
            **(extra or {}),
        )
        metrics = None if heldout_loss is None else {"heldout_loss": heldout_loss}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(train_state.params),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config_to_json(config)),
            ),
            metrics=metrics,
            force=True,
        )
        return step

    def wait(self) -> None:
        """Block until every save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring
    def restore(
        self,
        config: TransformerConfig,
        *,
        step: int | None = None,
        mesh: Mesh | None = None,
        axis: str = "data",
    ) -> Restored:
        """Everything saved at `step` (default the latest), checked against config.

        Args:
          config: the run's config; any field that differs from the saved
            one raises a ValueError naming it.
          step: which checkpoint (default: the latest).
          mesh: lay the arrays out on this mesh: params, optimizer state and
            rng replicated, attn_state's rows split over `axis` (default: the
            first local device).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {self.directory}")
        path = self.step_path(step)
        _check_items(path, ITEMS)
        config = _check_config(path, config)
        meta = _read_json_item(path, "meta")
        repl = _replicated(mesh)
        abstract = abstract_train_state(config)
        train = dict(
            step=abstract.step, opt_state=abstract.opt_state, rng=_abstract_rng()
        )
        train = _abstract(train, repl)
        if carries_state(config):
            if config.global_batch_size is None:
                raise ValueError("restoring attn_state needs config.global_batch_size")
            attn = jax.eval_shape(
                lambda: Transformer.initial_state(config, config.global_batch_size)
            )
            if mesh is None:
                train["attn_state"] = _abstract(attn, repl)
            else:
                train["attn_state"] = _abstract(attn, state_sharding(attn, mesh, axis))
        got = _restore_items(
            path, {"params": _abstract(abstract.params, repl), "train": train}
        )
        train = got["train"]
        return Restored(
            config=config,
            train_state=TrainState(
                step=train["step"], params=got["params"], opt_state=train["opt_state"]
            ),
            rng=jax.random.wrap_key_data(np.asarray(_local(train["rng"]))),
            attn_state=train.get("attn_state"),
            data_position=int(meta["data_position"]),
            heldout_loss=meta.get("heldout_loss"),
            meta=meta,
        )


def _local(x):
    """This process's copy of a replicated array (any array on one process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x
