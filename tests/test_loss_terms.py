"""loss_fn and the model's loss terms against NumPy sums written out by hand.

The reference's `ops/loss.py` defines the training loss as
l_lm + c_beta l_commit + l_codebook with l_lm the masked negative
log-likelihood averaged over *all* B P positions (its "unscaled" form, not per
counted token). The commitment loss of each GAU is the masked squared distance
of a key to its nearest codeword, summed over heads and averaged over B and L;
the model adds it up over its 2 n_layer GAUs. The references below recompute
each term from the logprobs, the mask and the quantizer inputs alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import brute_nearest
from tiny_model import (
    init_params,
    quantizer_inputs,
    random_mask,
    random_tokens,
    tiny_config,
)

import tvq
from tvq.model import loss_fn

B, P, N = 3, 8, 7


def random_outputs(seed):
    """Model-like outputs: [B, P, N] log-probabilities and two loss scalars."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, P, N)) * 2.0
    logprobs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    return dict(
        logprobs=jnp.asarray(logprobs),
        l_commit=jnp.asarray(rng.uniform(0.5, 2.0)),
        l_codebook=jnp.asarray(rng.uniform(0.5, 2.0)),
    )


def nll_by_loop(logprobs, targets, mask):
    """Sum of -log p(target) over counted positions, and their number."""
    total, count = 0.0, 0
    for b in range(B):
        for p in range(P):
            if mask[b, p]:
                total -= float(logprobs[b, p, targets[b, p]])
                count += 1
    return total, count


@pytest.mark.parametrize("c_beta", [0.37, 1.5])
def test_each_term_and_its_weight(c_beta):
    outputs = random_outputs(0)
    targets = random_tokens(1, (B, P), N)
    mask = random_mask(2, (B, P))
    config = tiny_config(c_beta=c_beta)
    terms = loss_fn(outputs, targets, mask, config)
    total, count = nll_by_loop(np.asarray(outputs["logprobs"]), targets, mask)
    assert 0 < count < B * P  # the two normalisations differ
    # The LM term is averaged over all B P positions, masked ones counting 0.
    np.testing.assert_allclose(terms["l_lm"], total / (B * P), rtol=1e-12)
    np.testing.assert_allclose(terms["l_lm_per_token"], total / count, rtol=1e-12)
    np.testing.assert_allclose(terms["l_commit"], outputs["l_commit"], rtol=0)
    np.testing.assert_allclose(terms["l_codebook"], outputs["l_codebook"], rtol=0)
    want = (
        total / (B * P)
        + c_beta * float(outputs["l_commit"])
        + float(outputs["l_codebook"])
    )
    np.testing.assert_allclose(terms["loss"], want, rtol=1e-12)


def test_gradient_weights_of_the_loss():
    """d loss / d logprob of a target is -mask / (B P); of l_commit c_beta; of
    l_codebook 1; every other log-probability gets 0."""
    outputs = random_outputs(3)
    targets = random_tokens(4, (B, P), N)
    mask = random_mask(5, (B, P))
    config = tiny_config(c_beta=0.37)
    grads = jax.grad(lambda o: loss_fn(o, targets, mask, config)["loss"])(outputs)
    want = np.zeros((B, P, N))
    for b in range(B):
        for p in range(P):
            want[b, p, targets[b, p]] = -mask[b, p] / (B * P)
    np.testing.assert_allclose(grads["logprobs"], want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grads["l_commit"], config.c_beta, rtol=1e-12)
    np.testing.assert_allclose(grads["l_codebook"], 1.0, rtol=1e-12)


def test_nothing_counted_gives_zero_lm_terms():
    outputs = random_outputs(6)
    targets = random_tokens(7, (B, P), N)
    terms = loss_fn(outputs, targets, np.zeros((B, P), np.int32), tiny_config())
    assert float(terms["l_lm"]) == 0.0
    assert float(terms["l_lm_per_token"]) == 0.0
    np.testing.assert_allclose(
        terms["loss"],
        0.37 * float(outputs["l_commit"]) + float(outputs["l_codebook"]),
        rtol=1e-12,
    )


@pytest.mark.parametrize("n_layer", [1, 2])
def test_model_commit_loss_is_the_sum_over_gaus(n_layer):
    """l_commit = sum over GAUs of mean over (b, l) of mask * sum_h |k - c(k)|^2."""
    config = tiny_config(n_layer=n_layer)
    params = init_params(config)
    tokens = random_tokens(8, (2, 16), config.n_vocab)
    mask = random_mask(9, (2, 16))
    out, gaus = quantizer_inputs(config, params, tokens, mask)
    assert len(gaus) == 2 * n_layer
    per_gau = []
    for _, keys, codebook in gaus:
        _, dist2 = brute_nearest(keys, codebook)  # [B, H, L]
        per_gau.append(np.mean(mask * np.sum(dist2, axis=1)))
    assert min(per_gau) > 0
    np.testing.assert_allclose(out["l_commit"], sum(per_gau), rtol=1e-10)
    # The surrogate codebook loss has value 0 (only its gradient counts).
    assert float(out["l_codebook"]) == 0.0
    # The training loss adds the commitment loss with weight c_beta.
    targets = random_tokens(10, (2, 16), config.n_vocab)
    terms = loss_fn(out, targets, mask, config)
    lp = np.asarray(out["logprobs"])
    nll = -np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    want = np.sum(mask * nll) / mask.size + config.c_beta * sum(per_gau)
    np.testing.assert_allclose(terms["loss"], want, rtol=1e-10)


def test_evaluation_has_no_quantizer_losses():
    config = tiny_config(is_train=False)
    params = init_params(config)
    tokens = random_tokens(11, (2, 8), config.n_vocab)
    state = tvq.Transformer.initial_state(config, 2, 8)
    out = jax.jit(tvq.Transformer(config).apply)({"params": params}, tokens, state)
    train_out, gaus = quantizer_inputs(
        config.replace(is_train=True), params, tokens, np.ones((2, 8), np.int32)
    )
    assert float(train_out["l_commit"]) > 0  # training would have counted some
    assert float(out["l_commit"]) == 0.0 and float(out["l_codebook"]) == 0.0
    np.testing.assert_allclose(out["logprobs"], train_out["logprobs"], rtol=1e-12)
