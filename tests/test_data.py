"""MQAR batches checked answer by answer against their own key-value pairs.

The reference reads each generated sequence like a person would: find the
query key in the pair section by a linear search, then compare the target and
the distance with what that search found.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from tvq.data import FILLER, MQAR_STATIC_ARGNAMES, accuracy_by_distance, mqar_batch

MODES = ["eager", "jit"]
# (batch_size, seq_len, n_vocab, n_pairs, n_queries, gap)
SETTINGS = {
    "full_region": (3, 16, 9, 4, 4, 0),
    "default_queries": (3, 40, 9, 4, None, 0),
    "few_queries_odd_tail": (4, 51, 64, 8, 3, 5),
    "gap_past_window": (2, 160, 33, 16, 12, 40),
    "odd_vocab_unused_token": (2, 30, 12, 5, 5, 2),
}


def make(mode: str, rng, **kwargs):
    if mode == "jit":
        return jax.jit(mqar_batch, static_argnames=MQAR_STATIC_ARGNAMES)(rng, **kwargs)
    return mqar_batch(rng, **kwargs)


def kwargs_of(setting):
    b, l, v, p, q, gap = setting
    return dict(batch_size=b, seq_len=l, n_vocab=v, n_pairs=p, n_queries=q, gap=gap)


def as_numpy(batch):
    return {name: np.asarray(array) for name, array in batch.items()}


def check_row(inputs, targets, loss_mask, distance, n_vocab, n_pairs, n_queries, gap):
    """Assert one generated row is a valid MQAR sequence, by brute force."""
    seq_len = len(inputs)
    half = (n_vocab - 1) // 2
    keys = [int(inputs[2 * i]) for i in range(n_pairs)]
    values = [int(inputs[2 * i + 1]) for i in range(n_pairs)]
    assert len(set(keys)) == n_pairs
    assert all(1 <= k <= half for k in keys)
    assert all(half + 1 <= v <= 2 * half for v in values)

    start = 2 * n_pairs + gap
    answers = [t for t in range(seq_len) if loss_mask[t]]
    assert len(answers) == n_queries
    asked = []
    for t in answers:
        assert t >= start and (t - start) % 2 == 0
        i = next(j for j in range(n_pairs) if keys[j] == inputs[t])
        asked.append(i)
        assert targets[t] == values[i]
        assert distance[t] == t - 2 * i
    assert len(set(asked)) == n_queries
    # Everything else in the query region and the gap is filler.
    answer_tokens = set(answers) | {t + 1 for t in answers}
    for t in range(2 * n_pairs, seq_len):
        if t not in answer_tokens:
            assert inputs[t] == FILLER
    for t in range(seq_len):
        assert targets[t] == (inputs[t + 1] if t + 1 < seq_len else FILLER)
        if not loss_mask[t]:
            assert distance[t] == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SETTINGS, ids=str)
def test_answers_match_pairs_brute_force(name, mode):
    kwargs = kwargs_of(SETTINGS[name])
    batch = as_numpy(make(mode, jax.random.key(7), **kwargs))
    n_queries = kwargs["n_queries"] or kwargs["n_pairs"]
    for b in range(kwargs["batch_size"]):
        check_row(
            *(batch[k][b] for k in ("inputs", "targets", "loss_mask", "distance")),
            kwargs["n_vocab"],
            kwargs["n_pairs"],
            n_queries,
            kwargs["gap"],
        )


def test_shapes_and_dtypes():
    batch = mqar_batch(
        jax.random.key(0), batch_size=5, seq_len=33, n_vocab=20, n_pairs=6, gap=3
    )
    assert sorted(batch) == ["distance", "inputs", "loss_mask", "targets"]
    for array in batch.values():
        assert array.shape == (5, 33)
        assert array.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(batch["loss_mask"]).sum(axis=1), 6)


def test_full_region_places_queries_back_to_back():
    # With seq_len = 2P + gap + 2Q every slot holds a query: positions known.
    p, q, gap = 5, 3, 4
    batch = mqar_batch(
        jax.random.key(1),
        batch_size=4,
        seq_len=2 * p + gap + 2 * q,
        n_vocab=11,
        n_pairs=p,
        n_queries=q,
        gap=gap,
    )
    expected = np.zeros([4, 2 * p + gap + 2 * q], dtype=np.int32)
    expected[:, [2 * p + gap + 2 * j for j in range(q)]] = 1
    np.testing.assert_array_equal(np.asarray(batch["loss_mask"]), expected)


def test_gap_puts_every_answer_beyond_the_window():
    # Key i at 2i, query at >= 2P + gap, so the distance is at least gap + 2.
    window, p = 32, 16
    batch = as_numpy(
        mqar_batch(
            jax.random.key(2),
            batch_size=8,
            seq_len=128,
            n_vocab=40,
            n_pairs=p,
            gap=window,
        )
    )
    answer = batch["loss_mask"] == 1
    assert batch["distance"][answer].min() >= window + 2
    assert batch["distance"][answer].max() <= 128 - 2


def test_all_keys_and_slots_get_used():
    # Over many rows every pair gets asked and every slot gets a query.
    p, q, n_slot = 6, 2, 5
    batch = as_numpy(
        mqar_batch(
            jax.random.key(3),
            batch_size=200,
            seq_len=2 * p + 2 * n_slot,
            n_vocab=13,
            n_pairs=p,
            n_queries=q,
        )
    )
    rows, cols = np.nonzero(batch["loss_mask"])
    pair_index = (cols - batch["distance"][rows, cols]) // 2
    assert set(pair_index.tolist()) == set(range(p))
    assert set(((cols - 2 * p) // 2).tolist()) == set(range(n_slot))


def test_fixed_rng_is_deterministic_and_rngs_differ():
    kwargs = kwargs_of(SETTINGS["few_queries_odd_tail"])
    first = as_numpy(mqar_batch(jax.random.key(11), **kwargs))
    again = as_numpy(mqar_batch(jax.random.key(11), **kwargs))
    other = as_numpy(mqar_batch(jax.random.key(12), **kwargs))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["inputs"], other["inputs"])


@pytest.mark.parametrize("name", SETTINGS, ids=str)
def test_jit_equals_eager(name):
    kwargs = kwargs_of(SETTINGS[name])
    eager = as_numpy(make("eager", jax.random.key(5), **kwargs))
    jitted = as_numpy(make("jit", jax.random.key(5), **kwargs))
    for key in eager:
        np.testing.assert_array_equal(eager[key], jitted[key])


GOOD = dict(batch_size=2, seq_len=20, n_vocab=9, n_pairs=4, n_queries=3, gap=2)
BAD_CASES = {
    "batch_zero": (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    "pairs_zero": (dict(n_pairs=0), "n_pairs must be an int >= 1, got 0"),
    "queries_zero": (dict(n_queries=0), "n_queries must be an int >= 1, got 0"),
    "gap_negative": (dict(gap=-1), "gap must be an int >= 0, got -1"),
    "seq_len_float": (dict(seq_len=20.0), "seq_len must be an int >= 1, got 20.0"),
    "pairs_bool": (dict(n_pairs=True), "n_pairs must be an int >= 1, got True"),
    "queries_exceed_pairs": (
        dict(n_queries=5),
        "n_queries=5 must not exceed n_pairs=4",
    ),
    "vocab_too_small": (
        dict(n_vocab=8),
        "n_vocab=8 is too small for n_pairs=4 distinct keys: "
        "need n_vocab >= 2 * n_pairs + 1 = 9",
    ),
    "seq_too_short": (
        dict(seq_len=15, gap=2),
        "seq_len=15 is too short: need 2 * n_pairs + gap + 2 * n_queries = 16",
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BAD_CASES, ids=str)
def test_bad_arguments_raise(case, mode):
    change, message = BAD_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        make(mode, jax.random.key(0), **(GOOD | change))


def test_accuracy_by_distance_brute_force():
    rng = np.random.default_rng(0)
    b, l = 6, 50
    loss_mask = rng.random([b, l]) < 0.4
    # Even distances 2..68: bin [25, 26) stays empty, 60..68 fall outside.
    distance = np.where(loss_mask, 2 * rng.integers(1, 35, [b, l]), 0)
    correct = rng.random([b, l]) < 0.6
    bins = np.array([0, 10, 25, 26, 40, 58])
    accuracy, count = accuracy_by_distance(correct, loss_mask, distance, bins)

    n_bin = len(bins) - 1
    hits, totals = np.zeros(n_bin), np.zeros(n_bin, dtype=int)
    for i in range(b):
        for t in range(l):
            if not loss_mask[i, t]:
                continue
            d = distance[i, t]
            for n in range(n_bin):
                last = n == n_bin - 1
                if bins[n] <= d < bins[n + 1] or (last and d == bins[n + 1]):
                    totals[n] += 1
                    hits[n] += correct[i, t]
    np.testing.assert_array_equal(count, totals)
    assert totals[2] == 0 and totals.sum() < loss_mask.sum()
    for n in range(n_bin):
        if totals[n] == 0:
            assert np.isnan(accuracy[n])
        else:
            assert accuracy[n] == hits[n] / totals[n]


@pytest.mark.parametrize(
    "bins, message",
    [
        ([5], "bins must be at least 2 strictly increasing edges, got [5]"),
        ([0, 3, 3], "bins must be at least 2 strictly increasing edges, got [0, 3, 3]"),
        ([[0, 1]], "bins must have shape [E] (1 dims), got shape [1, 2]"),
    ],
)
def test_accuracy_by_distance_bad_bins(bins, message):
    zeros = np.zeros([2, 3], dtype=int)
    with pytest.raises(ValueError, match=re.escape(message)):
        accuracy_by_distance(zeros, zeros, zeros, bins)


def test_accuracy_by_distance_bad_shapes():
    good = np.zeros([2, 3], dtype=int)
    with pytest.raises(
        ValueError, match=re.escape("distance must have shape [B=2, L=3]")
    ):
        accuracy_by_distance(good, good, np.zeros([2, 4], dtype=int), [0, 1])
