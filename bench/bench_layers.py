r"""Benchmark (not a test): one convolution layer at a time, lwjax against PyTorch.

Where a whole step of ``bench_steps.py`` is slower than PyTorch, this says which kind of layer is:
the first (2 -> F channels, k x k, ReLU), a hidden one (F -> F, k x k, ReLU) or the 1x1 head
(F -> 2). Each is timed forward, and forward + backward (the weight gradient, and the input
gradient except for the first layer, as in training). The lwjax layer is flax's ``nn.Conv`` as
``nets.DeepNet`` builds it (float32 parameters, ``--compute_dtype`` compute); the PyTorch one is
``nn.Conv2d`` channels-last (under autocast for bfloat16), with the same precision settings as
``bench_steps.py`` (TF32 as JAX does, cuDNN benchmark mode unless ``--notorch_cudnn_benchmark``).

  python3 bench/bench_layers.py --batch_sizes=8 --compute_dtype=float32,bfloat16
"""
import sys
from pathlib import Path

from absl import app

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_steps as bs  # noqa: E402  (its flags, timing and PyTorch set-up)

FLAGS = bs.FLAGS
LAYERS = ("first", "hidden", "head")
bs.flags.DEFINE_list("layers", list(LAYERS), f"which layer kinds to time, of {LAYERS}")


def shapes(kind: str) -> tuple:
  """(c_in, c_out, k, relu) of a layer kind for the flags' network."""
  f, k = FLAGS.features, FLAGS.kernel_size
  return {"first": (2, f, k, True), "hidden": (f, f, k, True), "head": (f, 2, 1, False)}[kind]


def flops(kind: str, batch: int, backward: bool) -> float:
  c_in, c_out, k, _ = shapes(kind)
  fwd = 2.0 * batch * FLAGS.image_size ** 2 * k * k * c_in * c_out
  return fwd * (1 + (2 if kind != "first" else 1)) if backward else fwd


def jax_layer(env, kind: str, batch: int, dtype: str, backward: bool):
  import flax.linen as nn
  jax, jnp = env.jax, env.jax.numpy
  c_in, c_out, k, relu = shapes(kind)
  conv = nn.Conv(c_out, (k, k), padding="SAME", dtype=jnp.dtype(dtype))
  kx, kg, kp = jax.random.split(jax.random.key(0), 3)
  s = FLAGS.image_size
  x = jax.random.normal(kx, (batch, s, s, c_in), jnp.float32)
  params = conv.init(kp, x)

  def fwd(p, x):
    y = conv.apply(p, x)
    return jax.nn.relu(y) if relu else y

  if not backward:
    f = jax.jit(fwd)
  else:
    g = jax.random.normal(kg, (batch, s, s, c_out), jnp.float32)
    argnums = (0,) if kind == "first" else (0, 1)  # No input gradient into the image.
    f = jax.jit(jax.grad(lambda p, x: jnp.vdot(fwd(p, x).astype(jnp.float32), g), argnums))
  return lambda: f(params, x)


def torch_layer(env, kind: str, batch: int, dtype: str, backward: bool):
  torch, ref, dev = env.torch, env.ref, env.tdev
  c_in, c_out, k, relu = shapes(kind)
  gen = torch.Generator(device=dev).manual_seed(0)
  conv = torch.nn.Conv2d(c_in, c_out, k, padding="same").to(dev)
  conv = conv.to(memory_format=torch.channels_last)
  s = FLAGS.image_size
  x = torch.randn((batch, c_in, s, s), device=dev, generator=gen)
  x = x.contiguous(memory_format=torch.channels_last).requires_grad_(backward and kind != "first")
  g = torch.randn((batch, c_out, s, s), device=dev, generator=gen)
  g = g.contiguous(memory_format=torch.channels_last)

  def fwd():
    with ref.autocast(dev, dtype):
      y = conv(x)
      return torch.relu(y) if relu else y

  def run_fwd():
    with torch.no_grad():
      return fwd()

  def run_bwd():
    conv.weight.grad = conv.bias.grad = x.grad = None
    fwd().float().backward(g)
  return run_bwd if backward else run_fwd


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if set(FLAGS.layers) - set(LAYERS):
    raise app.UsageError(f"--layers: {sorted(set(FLAGS.layers) - set(LAYERS))} not in {LAYERS}")
  env = bs.Env()
  dtypes = [d.strip() for d in FLAGS.compute_dtype.split(",") if d.strip()]
  timing = dict(warmup=FLAGS.warmup, repeats=FLAGS.repeats, min_time_s=FLAGS.min_time_s)
  bs.log(f"device: {env.device_kind} ({env.platform}); {FLAGS.image_size}x{FLAGS.image_size}, "
         f"{FLAGS.kernel_size}x{FLAGS.kernel_size}, {FLAGS.features} channels; torch: "
         f"{'on' if env.torch is not None else env.torch_error or 'off'}")
  bs.log("| layer | mode | dtype | batch | TFLOP | lwjax ms | PyTorch ms | PyTorch / lwjax | |")
  bs.log("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for batch in (int(b) for b in FLAGS.batch_sizes.split(",") if b.strip()):
    for dtype in dtypes:
      for kind in FLAGS.layers:
        for backward in (False, True):
          row = {"layer": kind, "mode": "fwd+bwd" if backward else "fwd", "dtype": dtype,
                 "batch": batch, "tflop": flops(kind, batch, backward) / 1e12}
          try:
            t = bs.time_steps(jax_layer(env, kind, batch, dtype, backward),
                              env.jax.block_until_ready, **timing)
            row["ms"] = 1e3 * t["s"]
            if env.torch is not None:
              t = bs.time_steps(torch_layer(env, kind, batch, dtype, backward), env.torch_block,
                                **timing)
              row["torch_ms"] = 1e3 * t["s"]
              row["ratio"] = row["torch_ms"] / row["ms"]
          except Exception as e:  # One failing layer (out of memory, say) must not end the run.
            row["error"] = bs.short_error(e)
          finally:
            if env.torch is not None:
              bs.torch_cleanup(env)
          rows.append(row)
          cells = [f"{row.get(k, float('nan')):.3f}" if k in row else "-"
                   for k in ("ms", "torch_ms", "ratio")]
          bs.log(f"| {kind} | {row['mode']} | {dtype} | {batch} | {row['tflop']:.3g} | "
                 + " | ".join(cells) + f" | {row.get('error', '')} |")
  bs.write_json(FLAGS.json_out, {"meta": env.meta(), "rows": rows})
  return 0


if __name__ == "__main__":
  app.run(main)
