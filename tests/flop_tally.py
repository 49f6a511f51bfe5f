"""Count the matmul FLOPs a function really executes, by running its jaxpr.

An independent check of the FLOP formulas in tvq: rather than reading the
shapes off the code, this evaluates fn's jaxpr one primitive at a time on the
actual arguments, running every loop (scan, while, fori_loop, with trip
counts that depend on the data) for as many steps as it takes, and adds
2 * (output size) * (contracted size) for every dot_general it meets.
XLA's cost analysis cannot do this: it counts a loop body once.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend import core

CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def matmul_flops(fn, *args) -> int:
    """Matmul FLOPs of fn(*args), loops run to their real trip counts."""
    return sum(matmul_flops_by_dtype(fn, *args).values())


def matmul_flops_by_dtype(fn, *args) -> dict[str, int]:
    """Matmul FLOPs of fn(*args) by the dtype of the products' inputs."""
    closed = jax.make_jaxpr(fn)(*args)
    counter = {}
    run(closed.jaxpr, closed.consts, jax.tree.leaves(args), counter)
    return counter


def dot_flops(eqn, lhs, rhs) -> int:
    (contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(np.shape(lhs)[d] for d in contract)


def run(jaxpr, consts, args, counter):
    env = {}

    def read(var):
        return var.val if isinstance(var, core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general":
            dtype = "/".join(sorted({str(np.asarray(x).dtype) for x in invals}))
            counter[dtype] = counter.get(dtype, 0) + dot_flops(eqn, *invals)
            outs = eqn.primitive.bind(*invals, **eqn.params)
        elif name == "scan":
            outs = run_scan(eqn.params, invals, counter)
        elif name == "while":
            outs = run_while(eqn.params, invals, counter)
        elif name == "cond":
            branch = eqn.params["branches"][int(invals[0])]
            outs = run_closed(branch, invals[1:], counter)
        elif any(key in eqn.params for key in CALLS):
            key = next(key for key in CALLS if key in eqn.params)
            sub = eqn.params[key]
            closed = sub if hasattr(sub, "consts") else core.ClosedJaxpr(sub, ())
            outs = run_closed(closed, invals, counter)
        else:
            outs = eqn.primitive.bind(*invals, **eqn.params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def run_closed(closed, args, counter):
    return run(closed.jaxpr, closed.consts, list(args), counter)


def run_scan(params, invals, counter):
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, carry = invals[:n_consts], invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    steps = range(params["length"])
    ys = []
    for i in reversed(steps) if params["reverse"] else steps:
        out = run_closed(
            params["jaxpr"], [*consts, *carry, *(x[i] for x in xs)], counter
        )
        carry, y = out[:n_carry], out[n_carry:]
        ys.append(y)
    if params["reverse"]:
        ys.reverse()
    stacked = [
        jax.numpy.stack([y[j] for y in ys]) if ys else None
        for j in range(len(params["jaxpr"].out_avals) - n_carry)
    ]
    return [*carry, *stacked]


def run_while(params, invals, counter):
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = invals[:n_cond], invals[n_cond : n_cond + n_body]
    carry = invals[n_cond + n_body :]
    while bool(run_closed(params["cond_jaxpr"], [*cond_consts, *carry], counter)[0]):
        carry = run_closed(params["body_jaxpr"], [*body_consts, *carry], counter)
    return carry
