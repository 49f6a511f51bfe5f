"""tvq.Transformer equals a quadratic-time reference written here from its spec.

The reference builds the full L x L score matrix of every GAU, one key per
column: inside a block's exact window (its own block and the mem_len positions
before it) the score is (q + u).k_hat plus the relative term (q + v).R[i - j]
at distances <= M; further back the key is compressed into the aggcache, so it
scores (q + u).sg(c_z) and passes no gradient to the key (its value keeps its
gradient). tvq computes the equivalent per-code form (one score q.c_s + log n_s
per code against running means of the values), block by block, in linear time.

Axes: B batch, H heads, L length, S codes, K key width, V value width,
D model width, T block length, M mem_len.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tvq.vq import sg

# The models here are tiny: compile time dominates, and XLA's CPU backend
# compiles about twice as fast without LLVM optimizations.
jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0)
)
F64 = dict(dtype=jnp.dtype("float64"), param_dtype=jnp.dtype("float64"))
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-10)}


def small_config(
    block_len, mem_len, n_code, *, dtype="float32", attention="vq", **overrides
):
    """A tiny model: 2 heads, d_model 8, d_k 4, d_v 6, 11 tokens, one layer."""
    kwargs = dict(
        n_vocab=11,
        d_model=8,
        d_k=4,
        d_v=6,
        n_head=2,
        n_code=n_code,
        n_layer=1,
        block_len=block_len,
        mem_len=mem_len,
        agg_cache=True,
        grad_thru_cache=True,
        pe_abs=False,
        pe_lam=10_000,
        c_beta=1e-4,
        c_gamma=0.99,
        e_tie=True,
        e_preln=True,
        e_scale=0.7,
        p_dropemb=0.0,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        is_train=False,
        attention=attention,
        dtype=dtype,
        param_dtype="float64" if dtype == "float64" else "float32",
    )
    kwargs.update(overrides)
    return tvq.TransformerConfig.create(**kwargs)


def random_params(config, seed=0):
    """Random params in the tree `Transformer.init` makes (only its shapes are
    taken from tvq; nothing is compiled).

    Kernels and embeddings are normal with variance 1 / fan-in; gains, biases,
    u, v and pe_scale are random too (their init values 1 or 0 would hide a
    wrong formula); counts lie in [0.5, 2] and sums make codewords of norm
    d_k^(1/4), the keys' norm.
    """
    tokens = jax.ShapeDtypeStruct([1, config.block_len], jnp.int32)
    state = jax.eval_shape(lambda: tvq.Transformer.initial_state(config, 1))
    spec = tvq.VQSpec(jnp.ones([1]), jnp.ones([1]), jnp.ones([1, config.block_len]))
    shapes = jax.eval_shape(
        tvq.Transformer(config).init, jax.random.key(0), tokens, state, spec
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        shape = leaf.shape
        if "kernel" in name:
            new = rng.standard_normal(shape) / np.sqrt(shape[0])
        elif "embs" in name:
            new = rng.standard_normal(shape)
        elif "c_count" in name:
            new = rng.uniform(0.5, 2.0, shape)
        elif "c_sum" in name:
            new = rng.standard_normal(shape)
            new *= config.d_k**0.25 / np.linalg.norm(new, axis=-1, keepdims=True)
        elif "'g'" in name:
            new = 1.0 + 0.3 * rng.standard_normal(shape)
        else:  # u, v, biases, pe_scale
            new = 0.5 * rng.standard_normal(shape)
        return jnp.asarray(new, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    # c_sum holds count times codeword.
    for layer in range(config.n_layer if config.attention == "vq" else 0):
        for gau in params["params"][f"layers_{layer}"].values():
            qz = gau["quantizer"]
            qz["c_sum"] = qz["c_sum"] * qz["c_count"][..., None]
    return params


def random_tokens(config, batch, length, seed=1):
    """[batch, length] int32 tokens drawn uniformly from the vocabulary."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, config.n_vocab, [batch, length]), jnp.int32)


# ----------------------------------------------------------------------------
# The reference, in float64, from the params tree.


def rms(x, eps=1e-6):
    """x / sqrt(eps + mean(x^2)) over the last axis."""
    return x / jnp.sqrt(eps + jnp.mean(x * x, axis=-1, keepdims=True))


def sinusoid_table(positions, width, lam):
    """[N, width]: sin(p / lam^(2c/width)) for c < width/2, then the cosines."""
    p = jnp.asarray(positions, jnp.float64)[:, None]
    c = jnp.arange(width // 2, dtype=jnp.float64)[None, :]
    angle = p / lam ** (2.0 * c / width)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=1)


def gau_projections(p, x, config):
    """q, k [B, H, L, K], v [B, H, L, V], g [B, L, H V], u, vb [H, 1, K] and
    the relative keys R [H, M + 1, K] of one GAU, all scaled by d_k^(-1/4)."""
    b, length, _ = x.shape
    h, dk, dv, m = config.n_head, config.d_k, config.d_v, config.mem_len
    scale = dk**-0.25

    def heads(a, width):
        return a.reshape(b, length, h, width).transpose(0, 2, 1, 3)

    x_tilde = rms(x) * p["input_ln"]["g"] + p["input_ln"]["b"]
    q = rms(heads(x_tilde @ p["q_proj"]["kernel"], dk)) * scale
    kvg = x_tilde @ p["kvg_proj"]["kernel"]
    k = rms(heads(kvg[..., : h * dk], dk)) * scale
    v = jax.nn.silu(heads(kvg[..., h * dk : h * (dk + dv)], dv))
    g = jax.nn.silu(kvg[..., h * (dk + dv) :])
    u = p["u"].reshape(h, 1, dk) * scale
    vb = p["v"].reshape(h, 1, dk) * scale
    sins = sinusoid_table(np.arange(m + 1), config.d_model, config.pe_lam)
    r = (sins @ p["r_proj"]["kernel"]).reshape(m + 1, h, dk).transpose(1, 0, 2)
    return q, k, v, g, u, vb, r * scale


def relative_bias(q_pos, r, length):
    """[B, H, L, L]: (q_i + v).R[i - j] where 0 <= i - j <= M, else 0."""
    by_distance = jnp.einsum("bhik,hdk->bhid", q_pos, r)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    bias = 0.0
    for d in range(r.shape[1]):
        bias = bias + np.where(i - j == d, 1.0, 0.0) * by_distance[..., d, None]
    return bias


def quantize(k, p):
    """Nearest codes z [B, H, L] by brute force, k_hat (straight-through) and
    the stop-gradient codewords sg(c_z), both [B, H, L, K]."""
    c = p["c_sum"] / jnp.maximum(p["c_count"], 0.01)[..., None]
    diff = sg(k)[:, :, :, None, :] - c[None, :, None, :, :]
    z = jnp.argmin(jnp.sum(diff * diff, axis=-1), axis=-1)
    c_z = sg(c[np.arange(c.shape[0])[None, :, None], z])
    return z, c_z + k - sg(k), c_z


def gau_reference(p, x, config, record, st_in_cache=False):
    """One GAU's residual [B, L, D] by the quadratic form; appends its raw keys
    and codes to the list `record` (VQ). st_in_cache: the counterfactual where
    the cached keys pass their straight-through gradient too."""
    b, length, _ = x.shape
    t, m = config.block_len, config.mem_len
    q, k, v, g, u, vb, r = gau_projections(p, x, config)
    rel = relative_bias(q + vb, r, length)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    causal = j <= i
    if config.attention in ("dense", "dense_full"):
        scores = jnp.einsum("bhik,bhjk->bhij", q + u, k) + rel
        keep = causal
    else:
        z, k_hat, c_z = quantize(k, p["quantizer"])
        record.append((k, z))
        exact = jnp.einsum("bhik,bhjk->bhij", q + u, k_hat) + rel
        if config.agg_cache:
            window_start = (i // t) * t - m  # the block's start minus M
            cached = jnp.einsum("bhik,bhjk->bhij", q + u, k_hat if st_in_cache else c_z)
            scores = jnp.where(j >= window_start, exact, cached)
            keep = causal
        else:
            scores, keep = exact, causal & (i - j <= m)
    weights = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)
    attn = jnp.einsum("bhij,bhjv->bhiv", weights, v)
    attn = attn.transpose(0, 2, 1, 3).reshape(b, length, -1)
    return (attn * g) @ p["res_proj"]["kernel"]


def model_reference(params, tokens, config, st_in_cache=False):
    """[B, L, N] log-probabilities of the whole model from position 0, and the
    raw keys [B, H, L, K] and codes [B, H, L] of each VQ GAU, in order."""
    record = []
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params["params"])
    length, width = tokens.shape[1], config.d_model
    x = p["embs"][tokens]
    if config.pe_abs:
        x = x + p["pe_scale"] * sinusoid_table(np.arange(length), width, config.pe_lam)
    for layer in range(config.n_layer):
        for name in ("attn1", "attn2"):
            p_gau = p[f"layers_{layer}"][name]
            x = x + gau_reference(p_gau, x, config, record, st_in_cache)
    if config.e_preln:
        x = rms(x) * p["out_ln"]["g"] + p["out_ln"]["b"]
    if config.e_tie:
        logits = x @ p["embs"].T + p["bias_out"]
    else:
        logits = x @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
    return jax.nn.log_softmax(logits * config.e_scale, axis=-1), record


# Called directly (not inside another jit).
reference = jit(model_reference, static_argnames=("config", "st_in_cache"))


@functools.cache
def runner(config):
    """jitted Transformer(config).apply(params, tokens, state, vq_spec=None);
    one per config, so tests that share a config share its compilations."""
    model = tvq.Transformer(config)
    return jit(
        lambda params, tokens, state, spec=None: model.apply(
            params, tokens, state, spec
        )
    )


def model_logprobs(config, params, tokens):
    """tvq.Transformer's log-probabilities from the initial state."""
    state = tvq.Transformer.initial_state(config, tokens.shape[0])
    return runner(config)(params, tokens, state)["logprobs"]


# (block_len T, mem_len M, n_code S, length L, other config fields)
CASES = {
    "M=0": (4, 0, 5, 16, dict(pe_abs=True)),
    "M=T, S<T": (4, 4, 3, 16, {}),
    "M=2T, S>T, two layers": (2, 4, 7, 14, dict(n_layer=2, e_tie=False)),
    "one block": (8, 4, 16, 8, {}),
    "T=1": (1, 2, 3, 7, {}),
    "no aggcache, M=1.5T": (4, 6, 5, 20, dict(agg_cache=False, e_preln=False)),
    "dense": (4, 4, 0, 16, dict(attention="dense", pe_abs=True, e_tie=False)),
    "dense, M=1.5T": (4, 6, 0, 20, dict(attention="dense")),
    "dense_full": (4, 4, 0, 16, dict(attention="dense_full", pe_abs=True)),
}
F32_CASES = ("M=T, S<T", "no aggcache, M=1.5T", "dense", "dense_full")


@pytest.mark.parametrize(
    "case, dtype",
    [(c, "float64") for c in CASES] + [(c, "float32") for c in F32_CASES],
)
def test_model_equals_quadratic_reference(case, dtype):
    t, m, s, length, extra = CASES[case]
    config = small_config(t, m, s or None, dtype=dtype, **extra)
    params = random_params(config, seed=len(case))
    tokens = random_tokens(config, 2, length)
    got = model_logprobs(config, params, tokens)
    assert got.dtype == jnp.dtype(config.param_dtype)
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    want, _ = reference(params64, tokens, config.replace(**F64))
    np.testing.assert_allclose(got, want, **TOL[dtype])


def test_reference_window_is_not_the_whole_past():
    """The cache's sg(c_z) scores differ from the window's, so the cases above
    would catch a model that attended exactly (or not at all) past the window."""
    t, m, s, length, extra = CASES["M=T, S<T"]
    config = small_config(t, m, s, dtype="float64", **extra)
    params = random_params(config, seed=3)
    tokens = random_tokens(config, 2, length)
    want, _ = reference(params, tokens, config)
    for other in (config.replace(mem_len=m + t), config.replace(agg_cache=False)):
        got, _ = reference(params, tokens, other)
        assert not np.allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------
# vq_attention, the chapter-level function: no position terms, no state.


@pytest.mark.parametrize(
    "block_len, mem_len, agg_cache",
    [(4, 8, True), (4, 6, False)],
)
def test_vq_attention_equals_quadratic_form(block_len, mem_len, agg_cache):
    rng = np.random.default_rng(block_len + mem_len)
    b, h, length, dk, dv, s = 2, 2, 24, 4, 3, 6
    q, k = (rng.standard_normal([b, h, length, dk]) for _ in range(2))
    v = rng.standard_normal([b, h, length, dv])
    codebook = rng.standard_normal([h, s, dk])
    got = jit(tvq.vq_attention, static_argnames=("block_len", "mem_len", "agg_cache"))(
        q, k, v, codebook, block_len=block_len, mem_len=mem_len, agg_cache=agg_cache
    )
    # Nearest codewords by brute force; the window holds k_hat = c_z too, so
    # every score is q.c_z and only the sliding window (agg_cache off) differs.
    dist = np.sum((k[:, :, :, None] - codebook[None, :, None]) ** 2, axis=-1)
    k_hat = np.take_along_axis(
        codebook[None], np.argmin(dist, -1)[..., None].repeat(dk, -1), axis=2
    )
    scores = np.einsum("bhik,bhjk->bhij", q, k_hat)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    keep = (j <= i) & (agg_cache | (i - j <= mem_len))
    scores = np.where(keep, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, weights @ v, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Gradients.


def grad_config(**overrides):
    """T = M = 4, S = 5, float64, training (the quantizer's losses on)."""
    return small_config(4, 4, 5, dtype="float64", is_train=True, **overrides)


def lm_loss_of(config, tokens, targets):
    """params -> tvq.loss_fn's terms for one call from the initial state."""
    spec = tvq.VQSpec(jnp.ones([1]), jnp.ones([1]), jnp.ones(tokens.shape, jnp.int32))
    state = tvq.Transformer.initial_state(config, tokens.shape[0])
    mask = jnp.ones(tokens.shape)

    def losses(params):
        out = tvq.Transformer(config).apply(params, tokens, state, spec)
        return tvq.loss_fn(out, targets, mask, config)

    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pe_abs=True, e_tie=False),
        dict(agg_cache=False, e_tie=True),
        dict(attention="dense", pe_abs=True),
        dict(attention="dense_full"),
    ],
    ids=["aggcache", "no aggcache", "dense", "dense_full"],
)
def test_gradients_equal_the_reference(overrides):
    """Every gradient of the LM loss equals the quadratic reference's:
    straight-through keys in the window, none through the aggcache, none to
    the codebook. The full loss gives every parameter a nonzero finite one."""
    config = grad_config(**overrides)
    params = random_params(config, seed=11)
    tokens = random_tokens(config, 2, 20, seed=2)
    targets = random_tokens(config, 2, 20, seed=3)
    losses = lm_loss_of(config, tokens, targets)

    # One backward pass, vmapped over the two losses.
    def lm_and_full(p):
        terms = losses(p)
        return jnp.stack([terms["l_lm"], terms["loss"]])

    both = jit(jax.jacrev(lm_and_full))(params)
    got, full = jax.tree.map(lambda g: g[0], both), jax.tree.map(lambda g: g[1], both)

    def ref_loss(p):
        logprobs, _ = model_reference(p, tokens, config)
        return -jnp.mean(jnp.take_along_axis(logprobs, targets[..., None], -1))

    want = jit(jax.grad(ref_loss))(params)
    leaves = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), w, f in zip(
        leaves, jax.tree.leaves(want), jax.tree.leaves(full), strict=True
    ):
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(f)), name
        # bias_out is unused with untied logits, as in the reference.
        if "bias_out" in name and not config.e_tie:
            np.testing.assert_array_equal(f, 0.0, err_msg=name)
        else:
            assert np.any(f != 0), name
        if "quantizer" in name or "bias_out" in name and not config.e_tie:
            np.testing.assert_array_equal(g, 0.0, err_msg=name)
            np.testing.assert_array_equal(w, 0.0, err_msg=name)
        else:
            assert np.any(w != 0), name
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11, err_msg=name)


def test_key_gradient_is_not_the_dense_one():
    """The key projection's gradient differs from that of exact attention over
    k_hat with straight-through keys everywhere: the aggcache passes none."""
    config = grad_config()
    params = random_params(config, seed=12)
    tokens = random_tokens(config, 1, 20, seed=4)

    def kernel_grad(st_in_cache):
        def loss(p):
            logprobs, _ = model_reference(p, tokens, config, st_in_cache)
            return jnp.sum(jnp.sin(logprobs))

        return jit(jax.grad(loss))(params)["params"]["layers_0"]["attn1"]["kvg_proj"]

    no_cache_grad, cache_grad = kernel_grad(False), kernel_grad(True)
    assert not np.allclose(no_cache_grad["kernel"], cache_grad["kernel"], atol=1e-8)


def test_codebook_sgd_step_is_the_ema():
    """One SGD(lr=1) step on l_codebook sets c_sum, c_count to the EMA of the
    keys each GAU saw, scaled by n_device * n_block_per_update / (blocks in
    the call), whatever the LM loss does."""
    config = grad_config(n_layer=2)
    params = random_params(config, seed=13)
    length = 16
    tokens = random_tokens(config, 2, length, seed=5)
    loss_mask = np.ones([2, length], np.int32)
    loss_mask[1, 11:] = 0  # padding: no statistics
    n_device, n_block_per_update = 2, 3
    spec = tvq.VQSpec(
        jnp.array([n_device]), jnp.array([n_block_per_update]), jnp.asarray(loss_mask)
    )
    state = tvq.Transformer.initial_state(config, 2)

    def l_codebook(p):
        return tvq.Transformer(config).apply(p, tokens, state, spec)["l_codebook"]

    grads = jit(jax.grad(l_codebook))(params)["params"]
    _, record = reference(params, tokens, config)
    gamma = config.c_gamma
    scale = n_device * n_block_per_update / (length // config.block_len)
    mask = loss_mask.astype(bool)
    for index, (k, z) in enumerate(record):
        layer, name = f"layers_{index // 2}", ("attn1", "attn2")[index % 2]
        old = params["params"][layer][name]["quantizer"]
        k, z = np.asarray(k), np.asarray(z)
        sums = np.zeros(old["c_sum"].shape)
        counts = np.zeros(old["c_count"].shape)
        for bi, hi, li in np.ndindex(*z.shape):
            if mask[bi, li]:
                sums[hi, z[bi, hi, li]] += k[bi, hi, li]
                counts[hi, z[bi, hi, li]] += 1
        g = grads[layer][name]["quantizer"]
        np.testing.assert_allclose(
            old["c_sum"] - g["c_sum"],
            gamma * old["c_sum"] + (1 - gamma) * scale * sums,
            rtol=1e-10,
            atol=1e-12,
        )
        np.testing.assert_allclose(
            old["c_count"] - g["c_count"],
            gamma * old["c_count"] + (1 - gamma) * scale * counts,
            rtol=1e-10,
            atol=1e-12,
        )
    assert len(record) == 4
