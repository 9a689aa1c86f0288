"""The convex layer-wise stage: ``convex_stage``, its ``Program`` and the preparation from the
data (beta_max, Lipschitz constants, pfista's metric). The program is in ``gated``, its
certificate and ``finalize`` in ``certificate``, the solvers in ``fista`` and ``precond``."""
import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lwjax import nets
from lwjax import stages as stage
from lwjax.stages import precond
from lwjax.stages.certificate import accumulate, certificate, finalize_pass
from lwjax.stages.fista import fista, fista_solution
from lwjax.stages.gated import gate_filters, gated, gates, objective, predict, to_layer, whiten

# Power iteration approaches the Lipschitz constant from below; FISTA's step is 1/(margin * L).
_LIPSCHITZ_MARGIN = 1.1


@jax.jit
def _adjoint(variables, h, t, u):
  """``A^T t`` summed over one batch: A is the gated conv operator (the prediction minus skip)
  of the gate filters ``u``, ``t`` (N, *spatial, C_out); ``variables`` only give the shapes."""
  zero = jnp.zeros_like(t)
  return jax.vjp(lambda w: predict(w, h, zero, u, jnp.float32), variables)[1](t)[0]


@jax.jit
def _normal_op(variables, h, u):
  """``A^T A w`` summed over one batch."""
  zero = jnp.zeros(h.shape[:-1] + variables["v"].shape[-1:], jnp.float32)
  out, vjp = jax.vjp(lambda w: predict(w, h, zero, u, jnp.float32), variables)
  return vjp(out)[0]


def _needs_prepare() -> optax.GradientTransformation:
  def fail(*args, **kwargs):
    raise RuntimeError("this convex stage sets its solver up (FISTA's step size, a relative "
                       "beta) in Stage.prepare: call it first")
  return optax.GradientTransformation(fail, fail)


# ----------------------------------------------------------------------------------------------
# The stage.

SOLVERS = ("pfista", "fista", "adam")
GATES = ("white", "gaussian")


def convex_stage(*, features, kernel_size, ndim=2, beta, rho, solver="adam", tx=None, gate_seed=0,
                 gates="gaussian", out_channels=2, refit_head=False, fista_iters=None,
                 steps_per_epoch=1, relative_beta=False, power_iters=None, metric_samples=64,
                 metric_floor=1e-6, coupling=0.0, num_examples=None, init="zeros",
                 dtype=jnp.float32, precision=None) -> stage.Stage:
  """The convex layer-wise stage ("layerwise_convex") as a ``stage.Stage``.

  Args:
    features: hidden channels of the mapped ReLU layer, ``2 * P * out_channels``.
    kernel_size, ndim: k and the spatial dimensions (2: NHWC, 3: NDHWC).
    beta: group-lasso weight (> 0); with ``relative_beta`` a fraction of this stage's ``beta_max``
      (found in ``prepare``: each stage's features have their own scale).
    rho: ReLU-cone penalty (>= 0); 0 is the gated-ReLU relaxation.
    solver: "pfista" (FISTA in the metric of the input's patch covariance, ``precond``), "fista"
      or "adam" (``tx``, any rho). The FISTAs take one iteration per epoch, full-batch, rho = 0.
    tx: Adam with the run's schedule; required for "adam", unused by the FISTAs.
    gate_seed: seed of the fixed gate filters (give each stage its own).
    gates: "gaussian" (the seeded filters) or "white" (those whitened by the patch covariance of
      the stage input, ``gated.whiten``, in ``prepare``).
    refit_head: let ``finalize`` refit the 1x1 head on the ReLU features by least squares.
    fista_iters: FISTA iterations (the stage's epochs, at most); None: the run's epochs.
    steps_per_epoch: minibatches accumulated into one FISTA gradient
      (``data.steps_per_epoch(n, batch_size, full_pass=True)``).
    power_iters: power-iteration passes for the Lipschitz constant; None: 20 fista, 10 pfista.
    metric_samples: pfista: patches per patch dimension for the covariance; 0: every patch.
    metric_floor: pfista: covariance eigenvalues are clipped below at this fraction of the largest.
    coupling: pfista: c >= 0 in its metric ``(I_P + c 1 1^T) (x) S`` (1: the gates' common mode
      taken out; 0: separable by group, ``precond``).
    num_examples: pfista: training examples; None: counted in ``prepare`` (one more pass).
    init: "zeros" or "random" (a seeded normal start); both end at the same optimum.
    dtype: compute dtype of the V/Z conv (gates, certificate and refit use float32).
    precision: ``jax.default_matmul_precision`` of the training step's convs; None: the default.

  Returns:
    The stage. With a FISTA its ``tx`` works only after ``prepare``, which returns the stage to
    train and a report ({"beta_max", "beta"}, {"lipschitz"}, {"metric_rows", "metric_clipped"}).
    ``finalize`` reports "objective", "mse", "rel_gap" and "kkt_violation" (rho = 0),
    "constraint_violation", "relu_mismatch" (|pred_relu - pred| / |pred - skip|, may exceed 1),
    "mse_relu", "beta_max", "active_groups" and, with ``refit_head``, "mse_refit" (the returned
    variables then carry the refit head).
  """
  if features % (2 * out_channels):
    raise ValueError(f"features ({features}) must be divisible by 2 * out_channels "
                     f"({2 * out_channels}): one V and one Z neuron per arrangement and output")
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if rho < 0:
    raise ValueError(f"rho must be >= 0, got {rho}")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
  if solver != "adam" and rho != 0:
    raise ValueError(f"{solver} solves the gated relaxation (rho = 0) only, got rho = {rho}")
  if solver == "adam" and tx is None:
    raise ValueError("solver='adam' needs tx (Adam with the run's schedule)")
  if gates not in GATES:
    raise ValueError(f"gates must be one of {', '.join(GATES)}, got {gates!r}")
  if coupling < 0:
    raise ValueError(f"coupling must be >= 0, got {coupling}")
  if init not in ("zeros", "random"):
    raise ValueError(f"init must be 'zeros' or 'random', got {init!r}")
  program = Program(
      num=features // (2 * out_channels), out_channels=out_channels,
      kernel_shape=nets.kernel_shape(kernel_size, ndim), beta=beta, rho=rho, solver=solver,
      gate_seed=gate_seed, gates=gates, refit_head=refit_head, fista_iters=fista_iters,
      steps_per_epoch=steps_per_epoch, relative_beta=relative_beta,
      power_iters=power_iters or (10 if solver == "pfista" else 20),
      metric_samples=metric_samples, metric_floor=metric_floor, coupling=coupling,
      num_examples=num_examples, init_kind=init,
      dtype=None if dtype is None else jnp.dtype(dtype), precision=precision)
  # Adam's state does not depend on beta, so the memory planner can compile its real step before
  # ``prepare``; the FISTAs' steps need the data.
  return _stage(program, tx if solver == "adam" else _needs_prepare(),
                prepared=solver == "adam" and not relative_beta and gates == "gaussian")


@dataclasses.dataclass(frozen=True)
class Program:
  """``convex_stage``'s settings, without the data; ``beta`` is absolute once ``relative_beta``
  is False (``_prepare`` makes it so)."""
  num: int  # P, the arrangements (gate filters)
  out_channels: int  # C_out
  kernel_shape: tuple[int, ...]  # (*k)
  beta: float
  rho: float
  solver: str  # one of SOLVERS
  gate_seed: int
  gates: str  # one of GATES
  refit_head: bool
  fista_iters: Optional[int]
  steps_per_epoch: int
  relative_beta: bool
  power_iters: int
  metric_samples: int
  metric_floor: float
  coupling: float  # pfista: c of the metric's gate coupling (I_P + c 1 1^T)
  num_examples: Optional[int]
  init_kind: str  # "zeros" | "random"
  dtype: Any  # of the V/Z conv (None: that of h)
  precision: Optional[str]  # of the training step's convs (None: the default)
  # The gate filters (*k, C_in, P) once ``prepare`` has whitened them; None: the seeded ones.
  white_filters: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)
  # pfista, from ``prepare``: the data term's gradient (*k, C_in, P, C_out) and value at W = 0,
  # the first reference point of its loss.
  zero_grad: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)
  zero_data: Optional[float] = dataclasses.field(default=None, compare=False, repr=False)

  def shape(self, c_in: int) -> tuple[int, ...]:
    """Shape of V, of Z and of W = V - Z: (*k, C_in, P, C_out)."""
    return self.kernel_shape + (c_in, self.num, self.out_channels)

  def filters(self, c_in: int) -> np.ndarray:
    """The gate filters ``U`` (*k, C_in, P) float32."""
    if self.white_filters is not None:
      return self.white_filters
    return gate_filters(self.gate_seed, self.kernel_shape, len(self.kernel_shape), c_in, self.num)

  def init(self, rng, h_shape):
    """``{"v": V, "z": Z}``, for pfista ``{"w": W, "ref": reference}`` (see ``loss``): zeros, or
    normal with std 1 / sqrt(d); pfista's reference is W = 0 (``prepare`` gives its terms)."""
    shape = self.shape(h_shape[-1])
    names = ("w",) if self.solver == "pfista" else ("v", "z")
    if self.init_kind == "zeros":  # One array each: a donated state must not hold one twice.
      variables = {k: jnp.zeros(shape, jnp.float32) for k in names}
    else:
      scale = 1 / math.sqrt(math.prod(shape[:-2]))
      keys = jax.random.split(rng, len(names))
      variables = {k: scale * jax.random.normal(key, shape, jnp.float32)
                   for k, key in zip(names, keys)}
    if self.solver == "pfista":
      if self.zero_grad is None:
        raise RuntimeError("a pfista stage starts from the data term at W = 0, which "
                           "Stage.prepare computes: call it first")
      variables["ref"] = _reference(jnp.zeros(shape, jnp.float32), self.zero_grad, self.zero_data)
    return variables

  def loss(self, variables, h, skip, y, weight=None):
    """The objective at ``precision`` (its gradient too); the FISTAs get its smooth part only
    (their prox handles the group lasso), pfista in W = V - Z."""
    if self.precision is None:  # The caller's (or JAX_DEFAULT_MATMUL_PRECISION's) applies.
      return self._loss(variables, h, skip, y, weight)
    with jax.default_matmul_precision(self.precision):
      return self._loss(variables, h, skip, y, weight)

  def _loss(self, variables, h, skip, y, weight):
    u = self.filters(h.shape[-1])
    if self.solver == "pfista":
      # f(W) = f(W_r) + <grad f(W_r), W - W_r> + |A (W - W_r)|^2 / 2M about the reference W_r,
      # whose terms came exact from the last certificate: the step's precision only rounds
      # A (W - W_r), which vanishes as the solver converges, so TF32 or bfloat16 steps still
      # certify (mixed-precision refinement, BUILD_NOTES.md).
      ref = jax.lax.stop_gradient(variables["ref"])
      delta = variables["w"] - ref["w"]
      step = gated(delta, h, gates(h, u), self.dtype)
      data = ref["value"] + jnp.sum(ref["grad"] * delta) + stage.half_mse(step, 0.0, weight)
      return data, {"mse": 2 * data}
    value, aux = objective(variables, h, skip, y, u, beta=self.beta, rho=self.rho,
                           dtype=self.dtype, weight=weight)
    return (0.5 * aux["mse"] if self.solver == "fista" else value), aux

  def certificate(self, variables, feature_batches):
    """``Stage.certificate``: see ``certificate``."""
    c_in = variables["v"].shape[-3]
    return certificate(variables, feature_batches, beta=self.beta, u=self.filters(c_in))[0]

  def recenter(self, params, opt_state, feature_batches):
    """``Stage.recenter`` (pfista): the certificate of the current solution, and ``params`` with
    the loss's reference moved there (its data term and gradient, from the same pass)."""
    solution = precond.pfista_solution(params, opt_state)
    w = solution["v"] - solution["z"]
    record, grad = certificate(solution, feature_batches, beta=self.beta,
                               u=self.filters(w.shape[-3]))
    return record, {**params, "ref": _reference(w, grad, record["mse"] / 2)}

  def finalize(self, variables, feature_batches):
    """``Stage.finalize``: see ``finalize_pass``."""
    return finalize_pass(variables, feature_batches, beta=self.beta, rho=self.rho,
                         u=self.filters(variables["v"].shape[-3]), refit_head=self.refit_head)


def _reference(w, grad, data) -> dict:
  """pfista's reference point: W_r, the data term's gradient and value there (float32)."""
  return {"w": jnp.asarray(w, jnp.float32), "grad": jnp.asarray(grad, jnp.float32),
          "value": jnp.asarray(data, jnp.float32)}


def _stage(program: Program, tx: optax.GradientTransformation, *, prepared: bool) -> stage.Stage:
  """The ``stage.Stage`` of ``program`` solved by ``tx``; unless ``prepared``, its ``prepare``
  sets the absolute beta and the FISTAs' steps from the data (``_prepare``)."""
  st = stage.Stage(init=program.init, loss=program.loss, tx=tx, to_layer=to_layer,
                   finalize=program.finalize,
                   certificate=program.certificate if program.rho == 0 else None)
  if program.solver != "adam":
    solution = precond.pfista_solution if program.solver == "pfista" else fista_solution
    st = dataclasses.replace(st, solution=solution, epochs=program.fista_iters, full_pass=True)
  if program.solver == "pfista":
    st = dataclasses.replace(st, recenter=program.recenter)
  if not prepared:
    st = dataclasses.replace(st, prepare=functools.partial(_prepare, program, tx),
                             abstract_prepare=functools.partial(_abstract_prepare, program, tx))
  return st


def _fista_tx(program: Program, inner: optax.GradientTransformation):
  """``inner`` on the gradient accumulated over an epoch's ``steps_per_epoch`` minibatches."""
  return optax.MultiSteps(inner, every_k_schedule=program.steps_per_epoch
                          ).gradient_transformation()


def _abstract_prepare(program: Program, tx, h_shape) -> stage.Stage:
  """What ``_prepare`` returns, pfista's metric and white gates abstract: for the memory planner,
  never trained."""
  shape = program.shape(h_shape[-1])
  program = dataclasses.replace(program, relative_beta=False)
  if program.gates == "white":
    program = dataclasses.replace(program, white_filters=np.zeros(shape[:-1], np.float32))
  if program.solver == "pfista":
    program = dataclasses.replace(program, zero_grad=np.zeros(shape, np.float32), zero_data=0.0)
    d = math.prod(shape[:-2])
    metric = precond.Metric(jax.ShapeDtypeStruct((d, d), jnp.float32),
                            jax.ShapeDtypeStruct((d,), jnp.float32), program.coupling)
    tx = _fista_tx(program, precond.pfista(program.beta, metric))
  elif program.solver == "fista":
    tx = _fista_tx(program, fista(1.0, program.beta))
  return _stage(program, tx, prepared=True)


def _prepare(program: Program, tx, feature_batches, h_shape) -> tuple[stage.Stage, dict]:
  """``Stage.prepare``: the patch covariance (one pass; pfista, white gates), the data term at
  W = 0 (one pass, ``relative_beta`` or pfista: ``beta_max``, pfista's first reference), then
  the FISTAs' Lipschitz constant (``power_iters`` passes). Returns (stage, report)."""
  report, shape = {}, program.shape(h_shape[-1])
  with jax.default_matmul_precision("highest"):
    if program.solver == "pfista" or program.gates == "white":
      basis, lam, report = _covariance(program, feature_batches, shape)
    if program.gates == "white":
      program = dataclasses.replace(
          program, white_filters=whiten(program.filters(shape[-3]), basis, lam))
    u = program.filters(shape[-3])
    if program.relative_beta or program.solver == "pfista":
      grad, data = _at_zero(feature_batches, shape, u)
      program = dataclasses.replace(program, zero_grad=grad.astype(np.float32), zero_data=data)
    if program.relative_beta:
      report["beta_max"] = float(np.sqrt(np.sum(grad * grad, axis=tuple(range(grad.ndim - 2)))
                                         ).max())
      if not report["beta_max"] > 0:  # Else beta = 0 would pass unchecked and divide later.
        raise ValueError(f"convex stage: beta_max = {report['beta_max']} over the training set: "
                         f"its gated features are zero everywhere (an empty previous layer: "
                         f"every group pruned, --beta too large?) or the target equals the skip; "
                         f"there is nothing to fit")
      report["beta"] = program.beta * report["beta_max"]
      program = dataclasses.replace(program, beta=report["beta"], relative_beta=False)
    if program.solver == "fista":
      report["lipschitz"] = _lipschitz(feature_batches, shape, u, program.gate_seed,
                                       program.power_iters)
      step = 1.0 / (_LIPSCHITZ_MARGIN * report["lipschitz"])
      tx = _fista_tx(program, fista(step, program.beta))
    elif program.solver == "pfista":
      report["lipschitz"] = _metric_lipschitz(feature_batches, shape, u, program.gate_seed,
                                              basis, lam, program.coupling, program.power_iters)
      if not report["lipschitz"] > 0:
        raise ValueError(f"convex stage: pfista's power iteration found A^T A = 0: {_EMPTY}")
      # pfista's metric ``L_H * margin * H`` in S's eigenbasis.
      scale = _LIPSCHITZ_MARGIN * report["lipschitz"] * lam
      metric = precond.Metric(basis.astype(np.float32), scale.astype(np.float32),
                              program.coupling)
      tx = _fista_tx(program, precond.pfista(program.beta, metric))
  return _stage(program, tx, prepared=True), report


def _covariance(program: Program, feature_batches, shape) -> tuple[np.ndarray, np.ndarray, dict]:
  """The stage input's patch covariance ``S = Q diag(lam) Q^T``: (Q, lam, report), the report
  with the patches of the estimate and the eigenvalues of S raised to the floor."""
  d = math.prod(shape[:-2])
  num_examples = program.num_examples or sum(len(h) for h, _, _ in feature_batches())
  rows = (-(-program.metric_samples * d // num_examples) if program.metric_samples
          else np.iinfo(np.int32).max)
  s, count = precond.patch_covariance(feature_batches, program.kernel_shape,
                                      rows_per_example=rows, seed=program.gate_seed)
  basis, lam = precond.factorise(s, program.metric_floor)
  report = {"metric_rows": count,
            "metric_clipped": int(np.sum(lam <= program.metric_floor * lam.max()))}
  return basis, lam, report


_EMPTY = ("the stage's gated features are zero everywhere (an empty previous layer: every group "
          "pruned, --beta too large?); there is nothing to fit")


def _at_zero(feature_batches, shape, u) -> tuple[np.ndarray, float]:
  """The data term's gradient ``-A^T r / M`` (*k, C_in, P, C_out) float64 and value
  ``|r|^2 / 2M`` at W = 0 over the training set (r = y - skip). The largest group norm of the
  gradient is ``beta_max``, the smallest beta at which W = 0 is optimal."""
  zero = {"v": jnp.zeros(shape, jnp.float32), "z": jnp.zeros(shape, jnp.float32)}
  acc, elements = None, 0
  for h, skip, y in feature_batches():
    acc = accumulate(acc, (_adjoint(zero, h, y - skip, u)["v"], jnp.sum(jnp.square(y - skip))))
    elements += y.size
  return -acc[0] / elements, float(acc[1] / (2 * elements))


def _normal(feature_batches, w, u):
  """``A^T A w / M`` over the training set for W = ``w`` (*k, C_in, P, C_out) (the gated
  operator of W = V - Z)."""
  acc, elements = None, 0
  vz = {"v": w, "z": jnp.zeros_like(w)}
  for h, skip, _ in feature_batches():
    g = _normal_op(vz, h, u)["v"]
    acc = g if acc is None else acc + g
    elements += skip.size
  return acc / elements


def _lipschitz(feature_batches, shape, u, gate_seed, iters):
  """Largest eigenvalue of ``A^T A / M`` over the training set by power iteration, from a
  seeded start (deterministic, as ``Stage.prepare`` must be)."""
  start = np.random.default_rng((gate_seed, 1)).standard_normal((2,) + shape, dtype=np.float32)
  w = {"v": jnp.asarray(start[0]), "z": jnp.asarray(start[1])}
  lipschitz = 0.0
  for _ in range(iters):
    norm = optax.tree_utils.tree_norm(w)
    if not norm > 0:  # A^T A w = 0 for a random w: no features (an empty previous layer).
      raise ValueError(f"convex stage: FISTA's power iteration found A^T A = 0: {_EMPTY}")
    # A = [A_W, -A_W] on (V, Z): A^T A (v, z) = (K (v - z), -K (v - z)).
    g = _normal(feature_batches, (w["v"] - w["z"]) / norm, u)
    w = {"v": g, "z": -g}
    # |A^T A w| / M with |w| = 1: a lower bound on L.
    lipschitz = float(optax.tree_utils.tree_norm(w))
  return lipschitz


def _metric_lipschitz(feature_batches, shape, u, gate_seed, basis, lam, coupling, iters):
  """``L_H``, the largest eigenvalue of ``H^-1 K`` (K = A^T A / M on W, H = (I_P + coupling 1 1^T)
  (x) I (x) S, S = Q diag(lam) Q^T), by seeded power iteration in S's basis: the last Rayleigh
  quotient, a lower bound."""
  q = jnp.asarray(basis, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  num = shape[-2]
  v = jnp.asarray(np.random.default_rng((gate_seed, 1)).standard_normal(
      (len(lam), shape[-2] * shape[-1]), dtype=np.float32))
  quotient = 0.0
  for _ in range(iters):
    v = v / jnp.sqrt(precond.metric_dot(v, v, lam, coupling, num))  # unit length in the metric
    kw = _normal(feature_batches, jnp.matmul(q, v).reshape(shape), u)
    kv = jnp.matmul(q.T, kw.reshape(v.shape))
    quotient = float(jnp.sum(v * kv))
    if not quotient > 0:
      return quotient
    v = precond.metric_solve(kv, lam, coupling, num)
  return quotient
