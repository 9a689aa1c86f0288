"""A plain PyTorch implementation of lwjax's networks and training steps, for benchmarks only.

PyTorch is a benchmark dependency, never one of the package: nothing under ``lwjax/`` imports this.

What is here mirrors lwjax one to one, so that ``bench/bench_steps.py`` times the same work:

* ``DeepNet``: ``out = head(h_{L-1}) + x``, ``h_i = relu(conv_i(h_{i-1}))`` (k x k 'same' convs of
  ``features`` channels, a 1x1 head to 2 channels) = ``lwjax.nets.DeepNet``.
* ``TwoLayer``: the non-convex stage ``head(relu(conv(h))) + skip`` = ``lwjax.nets.TwoLayer``.
* ``ConvexStage``: the convex stage's objective (``lwjax.stages.gated.objective``): fixed gate conv
  (P channels, float32), one conv with ``2 * P * C_out`` channels for V and Z, the gated prediction,
  ``0.5 * mean`` squared error + ``beta`` * group norms + ``rho`` * cone penalty.
* Steps (one call = one Adam update, loss ``0.5 * mean((pred - y)**2)`` in float32): ``E2EStep``,
  ``StageStep`` (the frozen prefix under ``torch.no_grad()``, as lwjax's ``stop_gradient``) and
  ``Forward`` (evaluation under ``torch.inference_mode()``).

Tensors are NCHW logically and channels-last in memory (``torch.channels_last``), which is what
lwjax's NHWC arrays are; ``from_nhwc`` makes such a tensor from an NHWC array without a copy.
bfloat16 runs under ``torch.autocast`` (bfloat16 convs, float32 parameters and loss), as lwjax's
``--compute_dtype=bfloat16``. The lwjax steps also compute gradient and parameter norms each step;
these steps do not (a few microseconds of reductions over 3 M parameters).
"""
import contextlib
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def setup(device: str, tf32_conv: bool, tf32_matmul: bool, cudnn_benchmark: bool = True,
          benchmark_limit: int = -1) -> dict:
  """Global PyTorch settings for a fair comparison; returns them for the report.

  cuDNN picks its fastest algorithm per shape (``benchmark``), as XLA autotunes at compile time
  (``cudnn_benchmark=False``: its heuristic choice, which can only be as fast or slower; on an
  H200 it matched a search of 3 algorithms within 1%). ``benchmark_limit`` >= 0 sets how many
  algorithms that search times (``torch.backends.cudnn.benchmark_limit``, 0: all; -1 leaves
  PyTorch's default, whose bfloat16 7x7 search at 320x320 ran for over two minutes there).
  ``tf32_*`` should match what JAX does with float32 convs and matmuls on the same device (JAX's
  default precision may use TF32 on Ampere and newer GPUs; the benchmark measures it).
  """
  torch.backends.cudnn.benchmark = cudnn_benchmark and device.startswith("cuda")
  if benchmark_limit >= 0 and hasattr(torch.backends.cudnn, "benchmark_limit"):
    torch.backends.cudnn.benchmark_limit = benchmark_limit
  torch.backends.cudnn.allow_tf32 = tf32_conv  # Both have no effect on a CPU.
  torch.backends.cuda.matmul.allow_tf32 = tf32_matmul
  return {"torch": torch.__version__,
          "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
          "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
          "cudnn_benchmark_limit": getattr(torch.backends.cudnn, "benchmark_limit", None),
          "allow_tf32": {"cudnn": bool(torch.backends.cudnn.allow_tf32),
                         "matmul": bool(torch.backends.cuda.matmul.allow_tf32)},
          "threads": torch.get_num_threads()}


def torch_dtype(name: str) -> torch.dtype:
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: str, compute_dtype: str):
  """bfloat16 autocast for ``compute_dtype="bfloat16"``, nothing for float32."""
  if compute_dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device_type=device.split(":")[0], dtype=torch_dtype(compute_dtype))


def from_nhwc(a, device: str) -> torch.Tensor:
  """An NHWC array (NumPy or anything ``np.asarray`` takes) -> a channels-last NCHW tensor."""
  t = torch.from_numpy(np.array(a, np.float32, copy=True)).to(device)
  return t.permute(0, 3, 1, 2)  # NCHW shape, NHWC strides: torch.channels_last.


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().permute(0, 2, 3, 1).cpu().numpy()


def _conv(c_in, c_out, k):
  return nn.Conv2d(c_in, c_out, k, padding="same")


class DeepNet(nn.Module):
  """``lwjax.nets.DeepNet``: ``depth - 1`` k x k ReLU conv layers, a 1x1 head, + the input."""

  def __init__(self, depth: int, features: int, kernel_size: int, channels: int = 2):
    super().__init__()
    self.convs = nn.ModuleList(
        [_conv(channels if i == 0 else features, features, kernel_size) for i in range(depth - 1)])
    self.head = nn.Conv2d(features, channels, 1)

  def hidden(self, x, n: Optional[int] = None):
    h = x
    for conv in self.convs[: len(self.convs) if n is None else n]:
      h = F.relu(conv(h))
    return h

  def forward(self, x):
    return self.head(self.hidden(x)).float() + x


class TwoLayer(nn.Module):
  """``lwjax.nets.TwoLayer``: ``head(relu(conv(h))) + skip``."""

  def __init__(self, c_in: int, features: int, kernel_size: int, channels: int = 2):
    super().__init__()
    self.conv = _conv(c_in, features, kernel_size)
    self.head = nn.Conv2d(features, channels, 1)

  def forward(self, h, skip):
    return self.head(F.relu(self.conv(h))).float() + skip


class ConvexStage(nn.Module):
  """``lwjax.stages.gated.objective`` with Adam-trainable V, Z and fixed gate filters U.

  V and Z are each (P * C_out, C_in, k, k), output channel ``p * C_out + c``; one conv with
  ``cat([V, Z])`` gives channel ``s * P * C_out + p * C_out + c``, lwjax's order.
  """

  def __init__(self, c_in: int, features: int, kernel_size: int, *, beta: float, rho: float,
               channels: int = 2, seed: int = 0):
    super().__init__()
    if features % (2 * channels):
      raise ValueError(f"features ({features}) must be divisible by {2 * channels}")
    self.num, self.channels, self.beta, self.rho = features // (2 * channels), channels, beta, rho
    g = torch.Generator().manual_seed(seed)
    shape = (self.num * channels, c_in, kernel_size, kernel_size)
    scale = 1.0 / math.sqrt(c_in * kernel_size ** 2)
    self.v = nn.Parameter(torch.randn(shape, generator=g) * scale)
    self.z = nn.Parameter(torch.randn(shape, generator=g) * scale)
    self.register_buffer("u", torch.randn((self.num, c_in, kernel_size, kernel_size), generator=g))

  def objective(self, h, skip, y):
    with torch.no_grad(), torch.autocast(device_type=h.device.type, enabled=False):
      d = (F.conv2d(h.float(), self.u, padding="same") >= 0).float()  # (N, P, H, W)
    out = F.conv2d(h, torch.cat([self.v, self.z]), padding="same").float()
    n, _, hh, ww = out.shape
    out = out.reshape(n, 2, self.num, self.channels, hh, ww)
    pred = skip + torch.sum(d[:, :, None] * (out[:, 0] - out[:, 1]), dim=1)
    data = 0.5 * torch.mean(torch.square(pred - y))
    penalty = torch.sum(F.relu(-(2 * d - 1)[:, None, :, None] * out)) / (n * hh * ww)
    w = torch.stack([self.v, self.z])  # (2, P * C, C_in, k, k)
    norms = torch.sum(torch.sqrt(torch.sum(torch.square(w), dim=(2, 3, 4))))
    return data + self.beta * norms + self.rho * penalty


# ----------------------------------------------------------------------------------------------
# Loading lwjax parameters (HWIO kernels) into the modules, for the agreement check.

def _load_conv(conv: nn.Conv2d, p) -> None:
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.array(p["kernel"], np.float32)).permute(3, 2, 0, 1))
    conv.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))


def load_deepnet(net: DeepNet, params) -> DeepNet:
  """Copy an ``lwjax.nets.DeepNet`` parameter tree (``convs_i``, ``head``) into ``net``."""
  for i, conv in enumerate(net.convs):
    if f"convs_{i}" in params:
      _load_conv(conv, params[f"convs_{i}"])
  if "head" in params:
    _load_conv(net.head, params["head"])
  return net


def load_twolayer(stage: TwoLayer, variables) -> TwoLayer:
  _load_conv(stage.conv, variables["conv"])
  _load_conv(stage.head, variables["head"])
  return stage


def _vz_kernel(a):
  a = np.array(a, np.float32)  # (k, k, C_in, P, C_out)
  a = a.reshape(a.shape[:3] + (-1,))
  return torch.from_numpy(np.ascontiguousarray(a)).permute(3, 2, 0, 1)


def load_convex(stage: ConvexStage, variables, u) -> ConvexStage:
  """Copy lwjax convex variables ``{"v", "z"}`` (k, k, C_in, P, C_out) and gates U (k, k, C_in, P)."""
  with torch.no_grad():
    stage.v.copy_(_vz_kernel(variables["v"]))
    stage.z.copy_(_vz_kernel(variables["z"]))
    stage.u.copy_(torch.from_numpy(np.array(u, np.float32)).permute(3, 2, 0, 1))
  return stage


# ----------------------------------------------------------------------------------------------
# The steps.

def _adam(params, lr: float, device: str):
  params = list(params)
  try:  # The fused kernel is PyTorch's fastest Adam (CUDA; CPU in recent versions).
    return torch.optim.Adam(params, lr=lr, fused=True)
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.Adam(params, lr=lr, foreach=device.startswith("cuda"))


def _half_mse(pred, y):
  return 0.5 * torch.mean(torch.square(pred.float() - y))


class _Step:
  """Shared optimiser plumbing: ``step(*batch)`` does one Adam update and returns the loss."""
  params: list
  device: str
  compute_dtype: str

  def _init_opt(self, lr):
    self.opt = _adam(self.params, lr, self.device)

  def loss(self, *batch):
    raise NotImplementedError

  def grad(self, *batch):
    """Loss and global gradient norm without updating (for the agreement check)."""
    for p in self.params:
      p.grad = None
    loss = self.loss(*batch)
    loss.backward()
    norm = torch.sqrt(sum(torch.sum(torch.square(p.grad)) for p in self.params))
    return float(loss.detach()), float(norm)

  def step(self, *batch):
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(*batch)
    loss.backward()
    self.opt.step()
    return loss


class E2EStep(_Step):
  """End-to-end training of the whole ``DeepNet``: ``step(x, y)``."""

  def __init__(self, net: DeepNet, *, lr: float, device: str, compute_dtype: str):
    self.net, self.device, self.compute_dtype = net, device, compute_dtype
    self.params = list(net.parameters())
    self._init_opt(lr)

  def loss(self, x, y):
    with autocast(self.device, self.compute_dtype):
      pred = self.net(x)
    return _half_mse(pred, y)


class StageStep(_Step):
  """Layer-wise stage ``index + 1``: ``step(x, y)`` on ``h = prefix.hidden(x, index)`` (no grad),
  or ``step(h, x, y)`` on given (cached) features when ``prefix`` is None.

  ``stage`` is a ``TwoLayer`` (non-convex) or a ``ConvexStage``.
  """

  def __init__(self, prefix: Optional[DeepNet], stage: nn.Module, index: int, *, lr: float,
               device: str, compute_dtype: str):
    self.prefix, self.stage, self.index = prefix, stage, index
    self.device, self.compute_dtype = device, compute_dtype
    if prefix is not None:
      prefix.requires_grad_(False)
    self.params = list(stage.parameters())
    self._init_opt(lr)

  def features(self, x):
    if self.index == 0:
      return x
    with torch.no_grad(), autocast(self.device, self.compute_dtype):
      return self.prefix.hidden(x, self.index)

  def loss(self, *batch):
    if self.prefix is None:
      h, x, y = batch
    else:
      x, y = batch
      h = self.features(x)
    with autocast(self.device, self.compute_dtype):
      if isinstance(self.stage, ConvexStage):
        return self.stage.objective(h, x, y)
      pred = self.stage(h, x)
    return _half_mse(pred, y)


class Forward:
  """Evaluation of the full network: ``step(x)`` under ``inference_mode``."""

  def __init__(self, net: DeepNet, *, device: str, compute_dtype: str):
    self.net, self.device, self.compute_dtype = net, device, compute_dtype

  def step(self, x):
    with torch.inference_mode(), autocast(self.device, self.compute_dtype):
      return self.net(x)


def channels_last(module: nn.Module, device: str) -> nn.Module:
  return module.to(device=device, memory_format=torch.channels_last)
