"""Batched L-BFGS in JAX: many independent small problems minimised in lock-step.

Scaling-law fits are tiny (5 parameters) but need thousands of starting points. optax.lbfgs with
its zoom line search is correct but, under vmap, every lane waits for the slowest lane's line
search at every iteration. Here each outer iteration costs exactly one batched value-and-gradient:
a lane whose trial step fails the Armijo test keeps its direction and shrinks its step at the next
iteration, so backtracking is spread over iterations and lanes never wait for one another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# value_and_grad(x_SxP, data) -> (f_S, g_SxP): evaluates all lanes at once.
BatchedValueAndGrad = Callable[[jax.Array, object], tuple[jax.Array, jax.Array]]


class LbfgsResult(NamedTuple):
  x: jax.Array  # [S, P] final parameters
  value: jax.Array  # [S] objective at x
  grad_norm: jax.Array  # [S] max-norm of the gradient at x
  converged: jax.Array  # [S] bool: met a tolerance before max_iter with finite value
  iterations: jax.Array  # [S] outer iterations used by each lane


class _State(NamedTuple):
  x: jax.Array
  f: jax.Array
  g: jax.Array
  d: jax.Array
  t: jax.Array
  mem_s: jax.Array
  mem_y: jax.Array
  mem_rho: jax.Array
  done: jax.Array
  converged: jax.Array
  iters: jax.Array
  it: jax.Array


def _dot(u, v):
  return jnp.sum(u * v, axis=-1)


def _two_loop(g, mem_s, mem_y, mem_rho):
  """-H g for every lane; empty memory slots have rho = 0 and drop out."""
  # Memory as [m, S, P] so that lax.scan walks the pairs (newest pair is the last slot).
  s_m, y_m, rho_m = (jnp.moveaxis(v, 1, 0) for v in (mem_s, mem_y, mem_rho))

  def backward(q, pair):
    s, y, rho = pair
    a = rho * _dot(s, q)
    return q - a[:, None] * y, a

  q, alphas = jax.lax.scan(backward, g, (s_m, y_m, rho_m), reverse=True)
  s_new, y_new = s_m[-1], y_m[-1]
  yy = _dot(y_new, y_new)
  gamma = jnp.where((rho_m[-1] > 0) & (yy > 0),
                    _dot(s_new, y_new) / jnp.where(yy > 0, yy, 1.0), 1.0)

  def forward(r, pair):
    s, y, rho, a = pair
    b = rho * _dot(y, r)
    return r + (a - b)[:, None] * s, None

  r, _ = jax.lax.scan(forward, gamma[:, None] * q, (s_m, y_m, rho_m, alphas))
  return -r


def minimize(
    value_and_grad: BatchedValueAndGrad,
    x0: jax.Array,
    data: object = None,
    *,
    memory: int = 10,
    max_iter: int = 500,
    gtol: float = 1e-9,
    ftol: float = 1e-12,
    c1: float = 1e-4,
) -> LbfgsResult:
  """Minimises S independent problems from x0 [S, P] with L-BFGS + Armijo backtracking.

  Traceable: call it inside jax.jit (memory and max_iter must then be static).

  A lane stops when its gradient max-norm is below `gtol` or an accepted step lowers f by less
  than `ftol * |f|` (the form of scipy L-BFGS-B's pgtol and factr tests, without its floor of 1
  on |f|, since scaling-law objectives are ~1e-3); such lanes are `converged`. A lane
  whose step shrinks to nothing without satisfying them stops unconverged.
  """
  s_count, p = x0.shape
  dtype = x0.dtype
  f0, g0 = value_and_grad(x0, data)
  gnorm0 = jnp.max(jnp.abs(g0), axis=-1)
  zeros_mem = jnp.zeros((s_count, memory, p), dtype)
  state = _State(
      x=x0, f=f0, g=g0, d=-g0,
      # First step bounded to unit length, as there is no curvature information yet.
      t=jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.linalg.norm(g0, axis=-1), 1e-30)).astype(dtype),
      mem_s=zeros_mem, mem_y=zeros_mem, mem_rho=jnp.zeros((s_count, memory), dtype),
      done=~jnp.isfinite(f0) | (gnorm0 <= gtol),
      converged=jnp.isfinite(f0) & (gnorm0 <= gtol),
      iters=jnp.zeros((s_count,), jnp.int32), it=jnp.array(0, jnp.int32))
  tiny = jnp.finfo(dtype).tiny
  eps = jnp.finfo(dtype).eps

  def cond(st: _State):
    return (st.it < max_iter) & ~jnp.all(st.done)

  def body(st: _State):
    active = ~st.done
    x_try = st.x + st.t[:, None] * st.d
    f_try, g_try = value_and_grad(x_try, data)
    slope = _dot(st.g, st.d)
    ok = (jnp.isfinite(f_try) & jnp.all(jnp.isfinite(g_try), axis=-1)
          & (f_try <= st.f + c1 * st.t * slope))
    accept = active & ok
    # Curvature pair; kept only when positive enough to keep H positive definite.
    s = x_try - st.x
    y = g_try - st.g
    sy = _dot(s, y)
    good_pair = accept & (sy > eps * jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(y, axis=-1))

    def shift(mem, new):  # drop the oldest pair, append the new one
      return jnp.concatenate([mem[:, 1:], new[:, None]], axis=1)

    def sel(mask, a, b):  # per-start select, mask [S] broadcast over a's trailing axes
      return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    mem_s = sel(good_pair, shift(st.mem_s, s), st.mem_s)
    mem_y = sel(good_pair, shift(st.mem_y, y), st.mem_y)
    mem_rho = sel(good_pair, shift(st.mem_rho, 1.0 / jnp.where(sy > 0, sy, 1.0)), st.mem_rho)

    x = sel(accept, x_try, st.x)
    f = jnp.where(accept, f_try, st.f)
    g = sel(accept, g_try, st.g)
    d_new = _two_loop(g, mem_s, mem_y, mem_rho)
    # Fall back to steepest descent if the quasi-Newton direction is not a descent direction.
    descent = _dot(g, d_new) < 0
    d_new = sel(descent, d_new, -g)
    d = sel(accept, d_new, st.d)
    # Backtracking: shrink by a safeguarded quadratic interpolation of f along d.
    curv = f_try - st.f - st.t * slope
    t_quad = -slope * st.t**2 / jnp.where(curv > 0, 2.0 * curv, 1.0)
    t_back = jnp.where(jnp.isfinite(f_try) & (curv > 0),
                       jnp.clip(t_quad, 0.1 * st.t, 0.5 * st.t), 0.1 * st.t)
    t = jnp.where(accept, jnp.ones_like(st.t), jnp.where(active, t_back, st.t))

    gnorm = jnp.max(jnp.abs(g), axis=-1)
    small_grad = gnorm <= gtol
    small_decrease = accept & ((st.f - f) <= ftol * jnp.maximum(jnp.abs(st.f), tiny))
    stalled = active & ~accept & (t * jnp.linalg.norm(st.d, axis=-1)
                                  <= eps * jnp.maximum(jnp.linalg.norm(st.x, axis=-1), 1.0))
    newly_converged = active & (small_grad | small_decrease)
    done = st.done | newly_converged | stalled
    return _State(x, f, g, d, t, mem_s, mem_y, mem_rho, done,
                  st.converged | newly_converged,
                  st.iters + active.astype(jnp.int32), st.it + 1)

  st = jax.lax.while_loop(cond, body, state)
  return LbfgsResult(st.x, st.f, jnp.max(jnp.abs(st.g), axis=-1),
                     st.converged & jnp.isfinite(st.f), st.iters)
