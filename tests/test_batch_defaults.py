"""Optional batch fields take their documented defaults.

A training batch may leave out codebook_mask; it then defaults to loss_mask
(as in the reference, where one mask marks the real tokens). The codebook
statistics after one update window must be the EMA of the keys at the
loss_mask positions only, recomputed here from the recorded keys with
brute-force nearest codes and scatter-adds.
"""

from __future__ import annotations

import jax
import numpy as np
from helpers import brute_ema, brute_nearest
from tiny_model import quantizer_inputs, random_mask, random_tokens, tiny_config

from tvq import train as tt


def test_codebook_mask_defaults_to_loss_mask():
    config = tiny_config(sequence_len=8, update_len=8, n_layer=1, c_gamma=0.8)
    state = tt.init_train_state(config, jax.random.key(0))
    inputs = random_tokens(0, (8, 8), config.n_vocab)
    loss_mask = random_mask(1, (8, 8), keep=0.5)
    batch = dict(inputs=inputs, targets=np.roll(inputs, -1, 1), loss_mask=loss_mask)
    tx = tt.make_optimizer(config)
    new, metrics = tt.train_step(config, tx, state, batch, jax.random.key(1))
    assert int(metrics["n_counted"][0]) == int(loss_mask.sum())
    _, gaus = quantizer_inputs(config, state.params, inputs, loss_mask)
    assert len(gaus) == 2
    for path, keys, codebook in gaus:
        old, after = state.params, new.params
        for name in path:
            old, after = old[name], after[name]
        codes, _ = brute_nearest(keys, codebook)
        args = (keys, codes, old["c_sum"], old["c_count"], config.c_gamma)
        want_sum, want_count = brute_ema(*args, loss_mask)
        np.testing.assert_allclose(after["c_count"], want_count, rtol=1e-10)
        np.testing.assert_allclose(after["c_sum"], want_sum, rtol=1e-10, atol=1e-12)
        # Counting every position instead would give other statistics.
        _, all_count = brute_ema(*args, np.ones_like(loss_mask))
        assert np.max(np.abs(all_count - want_count)) > 0.1
