"""The models and their layers: shapes, initializers, and each fast form against its plain one.

Every comparison here is of float32 values at a stated precision: the module runs under
`jax.default_matmul_precision("highest")` (full float32 products), since a backend's
default is TF32 on NVIDIA GPUs and one bfloat16 pass on TPUs, which would move float32
matmuls by ~1e-3 and fail tolerances of 1e-5 for reasons unrelated to the code tested.
"""

import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, with_fast_compile

from research import backend
from research.models.cnn import CNN
from research.models.layers import Conv, max_pool_2x2


@pytest.fixture(autouse=True)
def full_float32_products():
  """Full float32 matmuls and convolutions on every backend (see the module docstring)."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.slow
def test_seed_cnn_has_the_keras_parameter_count_and_output_shape():
  model = CNN(num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert sum(x.size for x in jax.tree.leaves(variables)) == 121_930
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes["Conv_0"]["kernel"] == (3, 3, 1, 32)
  assert shapes["Conv_1"]["kernel"] == (3, 3, 32, 64)
  assert shapes["Dense_0"]["kernel"] == (1600, 64)
  assert shapes["Dense_1"]["kernel"] == (64, 10)
  logits = model.apply(variables, jnp.zeros((5, 28, 28, 1)))
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32


def test_seed_cnn_uses_keras_initializers():
  params = CNN(num_classes=10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  for layer in params.values():
    assert not np.any(np.asarray(layer["bias"]))  # zero biases
  kernel = np.asarray(params["Dense_0"]["kernel"])
  limit = np.sqrt(6 / (1600 + 64))  # Glorot-uniform bound
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), "VALID"), ((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"),
    ((1, 1), (2, 2), "SAME"), ((7, 7), (2, 2), "SAME")])
@pytest.mark.slow
def test_im2col_conv_matches_flax_conv(kernel, strides, padding):
  x = jax.random.normal(jax.random.key(1), (2, 11, 9, 5))
  ours = Conv(4, kernel, strides, padding)
  variables = ours.init(jax.random.key(0), x)
  reference = nn.Conv(4, kernel, strides, padding).apply(variables, x)
  np.testing.assert_allclose(ours.apply(variables, x), reference, atol=1e-5)
  gradient = lambda module: jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
  np.testing.assert_allclose(gradient(ours)["params"]["kernel"],
                             gradient(nn.Conv(4, kernel, strides, padding))["params"]["kernel"],
                             rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.slow
def test_max_pool_matches_flax_including_odd_sizes_and_ties():
  # Small integers: most windows hold ties, whose gradient must go to the first maximum
  # in row-major window order, as nn.max_pool's (and Keras's) does, not be split.
  x = jax.random.randint(jax.random.key(2), (3, 11, 13, 4), 0, 3).astype(jnp.float32)
  flax_pool = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
  weights = jax.random.normal(jax.random.key(3), flax_pool(x).shape)
  gradient = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
  np.testing.assert_array_equal(gradient(max_pool_2x2), gradient(flax_pool))


def _assert_same_outputs_and_gradients(apply, reference, variables, x):
  loss = lambda f: lambda v, x: jnp.sum(f(v, x) ** 2)

  @jax.jit  # one program per side: op by op, each custom-gradient layer is dozens of compiles
  def outputs_and_gradients(v, x):
    # Gradients of the parameters and of the input, each side computed alone.
    return ((apply(v, x), jax.grad(loss(apply), (0, 1))(v, x)),
            (reference(v, x), jax.grad(loss(reference), (0, 1))(v, x)))

  (ours, our_grads), (theirs, their_grads) = outputs_and_gradients(variables, x)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(their_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 13, 13, 32), (2, 12, 11, 3)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.slow
@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compared within tolerances
def test_conv_relu_pool_equals_conv_then_relu_then_pool(shape, ties):
  from research.models.layers import ConvReluPool

  x = jax.random.normal(jax.random.key(1), shape)
  if ties:  # constant regions, as in Fashion-MNIST's black background: tied pool windows
    x = x.at[:, : shape[1] // 2].set(0.0).at[:, shape[1] // 2:].set(1.0)
  fused = ConvReluPool(8)
  variables = fused.init(jax.random.key(0), x)
  reference = lambda v, x: nn.max_pool(nn.relu(nn.Conv(8, (3, 3), padding="VALID").apply(v, x)),
                                        (2, 2), (2, 2))
  _assert_same_outputs_and_gradients(fused.apply, reference, variables, x)


@pytest.mark.parametrize("shape, kernel", [((2, 13, 13, 4), (3, 3)), ((2, 28, 27, 1), (3, 3)),
                                           ((1, 12, 12, 2), (5, 5)), ((1, 9, 8, 3), (2, 2))])
@pytest.mark.slow
def test_all_forms_of_the_phase_patches_are_the_same_map(shape, kernel):
  # The forward runs the stacked form, the input gradient transposes the concatenated one
  # and a weight gradient may read the transposed one: all must be the convolution
  # windows at the four pool phases.
  from research.models.layers import _phase_patches

  x = jax.random.normal(jax.random.key(2), shape)
  stacked = _phase_patches(x, kernel)
  np.testing.assert_array_equal(stacked, _phase_patches(x, kernel, form="concatenated"))
  np.testing.assert_array_equal(stacked.T, _phase_patches(x, kernel, form="transposed"))
  kh, kw = kernel
  rows = stacked.reshape(shape[0], (shape[1] - kh + 1) // 2, (shape[2] - kw + 1) // 2, 2, 2, -1)
  for a, b, i, j in [(0, 0, 0, 0), (1, 0, 2, 1), (1, 1, 0, 2)]:
    window = x[:, 2 * i + a:2 * i + a + kh, 2 * j + b:2 * j + b + kw].reshape(shape[0], -1)
    np.testing.assert_array_equal(rows[:, i, j, a, b], window)


def test_max_and_first_is_max_and_argmax_with_ties_and_nan():
  from research.models.layers import _max_and_first

  nan, inf = jnp.nan, jnp.inf
  y = jnp.array([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, nan, 5.0, nan],
                 [nan, 2.0, nan, 7.0], [-inf, -inf, -inf, -inf], [4.0, 1.0, 2.0, 9.0]])
  for rows in (y, y.T):  # reduce over the last axis, then over the first
    axis = 1 if rows is y else 0
    pooled, first = jax.jit(_max_and_first, static_argnums=1)(rows, axis)
    np.testing.assert_array_equal(pooled, jnp.max(rows, axis))
    np.testing.assert_array_equal(first, jnp.argmax(rows, axis))
  # Its derivative is that of the first maximal entry.
  y_dot = jax.random.normal(jax.random.key(0), y.shape)
  (_, _), (pooled_dot, _) = jax.jvp(lambda y: _max_and_first(y, 1), (y,), (y_dot,))
  np.testing.assert_array_equal(pooled_dot, jnp.take_along_axis(
      y_dot, jnp.argmax(y, 1)[:, None], axis=1)[:, 0])


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("features", [8, 32, 33])
@pytest.mark.slow
def test_direct_form_only_for_narrow_shallow_layers_and_equal_to_the_matmul_form(features):
  # The seed CNN's first layer (3x3 on one channel) runs as multiply-adds, not a matmul;
  # both forms give the same values and gradients for the same parameters.
  from research.models import layers

  x = jax.random.uniform(jax.random.key(4), (3, 28, 28, 1))  # no ties: jnp.max splits them
  w = jax.random.normal(jax.random.key(5), (9, features)) * 0.3
  assert layers._is_direct(w) == (features <= 32)
  matmul_form = lambda x, w: jnp.max((layers._phase_patches(x, (3, 3)) @ w).reshape(
      3, 13, 13, 4, features), axis=3)
  ours = lambda x, w: layers._phase_conv_max(x, w, (3, 3), jnp.dtype(jnp.float32))
  np.testing.assert_allclose(ours(x, w), matmul_form(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for argnum in (0, 1):
    np.testing.assert_allclose(jax.grad(loss(ours), argnum)(x, w),
                               jax.grad(loss(matmul_form), argnum)(x, w), rtol=1e-4, atol=1e-4)


def test_conv_relu_pool_propagates_nan():
  from research.models.layers import ConvReluPool

  x = jnp.zeros((1, 6, 6, 1)).at[0, 1, 1, 0].set(jnp.nan)
  layer = ConvReluPool(4)
  pooled = layer.apply(layer.init(jax.random.key(0), jnp.zeros_like(x)), x)
  assert jnp.isnan(pooled[0, 0, 0]).all() and not jnp.isnan(pooled[0, 1:, 1:]).any()


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.slow
def test_both_cnn_forms_share_parameters_and_outputs():
  x = jax.random.uniform(jax.random.key(3), (4, 28, 28, 1))
  fast, plain = CNN(num_classes=10), CNN(num_classes=10, conv_impl="xla")
  variables = fast.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(plain.init(jax.random.key(0), x))
  np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), atol=1e-5)


def test_to_bfloat16_is_bit_identical_to_astype():
  from research.models.layers import to_bfloat16

  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
  specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                       3.4e38, 1e-45, -1e-40], np.float32)  # ties, overflow, subnormals
  x = jnp.asarray(np.concatenate([bits.view(np.float32), specials]))
  ours, reference = to_bfloat16(x), x.astype(jnp.bfloat16)
  assert ours.dtype == jnp.bfloat16
  ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
  nan = np.isnan(reference)
  np.testing.assert_array_equal(np.isnan(ours), nan)
  np.testing.assert_array_equal(ours[~nan], reference[~nan])


# Row counts on either side of the weight gradient's two forms (transpose the gradient
# or the patches, whichever is smaller), and an odd one.
@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("shape", [(6, 5, 40), (3, 40), (1, 40)])
@pytest.mark.parametrize("features", [7, 60])
@pytest.mark.slow
def test_bfloat16_matmul_rounds_operands_and_accumulates_in_float32(shape, features):
  from research.models.layers import matmul

  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (40, features))
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  y = matmul(x, w, jnp.bfloat16)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, rounded(x) @ rounded(w), rtol=1e-5, atol=1e-5)
  # Gradients: the same products on bfloat16-rounded operands, float32 results.
  g = jax.random.normal(jax.random.key(2), y.shape)
  grad_x, grad_w = jax.grad(lambda x, w: jnp.sum(matmul(x, w, jnp.bfloat16) * g), (0, 1))(x, w)
  assert grad_x.dtype == grad_w.dtype == jnp.float32
  np.testing.assert_allclose(grad_x, rounded(g) @ rounded(w).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_w, rounded(x).reshape(-1, 40).T @ rounded(g).reshape(-1, features),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(matmul(x, w), x @ w)  # float32: the plain product


# Features 64 on 4 channels: the weight gradient transposes the (smaller) patches.
@pytest.mark.parametrize("shape, features", [((3, 13, 13, 32), 16), ((2, 12, 11, 8), 16),
                                             ((3, 28, 28, 1), 16), ((2, 12, 11, 4), 64)])
@pytest.mark.slow
@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compared within tolerances
def test_bfloat16_conv_relu_pool_equals_bfloat16_conv_then_relu_then_pool(shape, features):
  from research.models.layers import ConvReluPool

  x = jax.random.normal(jax.random.key(1), shape)
  x = x.at[:, : shape[1] // 3].set(0.0)  # tied pool windows
  fused = ConvReluPool(features, dtype=jnp.bfloat16)
  variables = fused.init(jax.random.key(0), x)
  plain = Conv(features, (3, 3), padding="VALID", impl="im2col", dtype=jnp.bfloat16)
  reference = lambda v, x: nn.max_pool(nn.relu(plain.apply(v, x)), (2, 2), (2, 2))
  _assert_same_outputs_and_gradients(fused.apply, reference, variables, x)
  if shape[-1] * 9 < 32:  # too narrow a contraction for bfloat16 to pay: float32, exactly
    f32 = ConvReluPool(features)
    np.testing.assert_array_equal(fused.apply(variables, x), f32.apply(variables, x))


# (2, 13, 13, 8): the matmul form; (2, 12, 12, 1): the direct form (a 9-wide layer).
@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("shape", [(2, 13, 13, 8), (2, 12, 12, 1)])
@pytest.mark.slow
def test_custom_gradients_are_differentiable_again(shape):
  # Reverse-over-reverse (a Hessian-vector product) through the im2col layers' own
  # gradients equals that of flax's layers.
  from research.models.layers import ConvReluPool

  x = jax.random.normal(jax.random.key(1), shape)
  fused = ConvReluPool(16)
  variables = fused.init(jax.random.key(0), x)
  reference = lambda v, x: nn.max_pool(nn.relu(nn.Conv(16, (3, 3), padding="VALID").apply(v, x)),
                                        (2, 2), (2, 2))
  direction = jax.tree.map(jnp.ones_like, variables)

  def hessian_times_direction(apply):
    gradient = jax.grad(lambda v: jnp.sum(jnp.sin(apply(v, x))))
    return jax.grad(lambda v: sum(jnp.vdot(g, d) for g, d in zip(
        jax.tree.leaves(gradient(v)), jax.tree.leaves(direction))))(variables)

  for a, b in zip(jax.tree.leaves(hessian_times_direction(fused.apply)),
                  jax.tree.leaves(hessian_times_direction(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cpu_only
@pytest.mark.slow
def test_bfloat16_seed_cnn_step_runs_its_products_in_bfloat16_on_ynnpack():
  # XLA:CPU runs a bfloat16 dot fast (YNNPACK, AMX) only in one operand layout; any other
  # silently becomes a float32 Eigen dot, several times slower. Guard the compiled form.
  model = CNN(num_classes=10, dtype=jnp.bfloat16)
  x = jnp.zeros((32, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  step = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x) ** 2)))
  # Compiled to be read, never run: research/backend.py's options for that (same HLO).
  hlo = step.lower(variables, x).compile(backend.current().analysis_compile_options).as_text()
  dots, header = [], ""  # (the signature of the computation holding it, a dot)
  for line in hlo.splitlines():
    if line.startswith(("%", "ENTRY")):
      header = line
    elif " dot(" in line:
      dots.append((header, line))
  bf16 = [h for h, _ in dots if re.match(r"%\S+ \(\S+ bf16\[[\d,]+\], \S+ bf16\[", h)]
  # conv2, Dense_0, Dense_1: forward, input and weight gradients, each alone in a
  # YNNPACK fusion. conv1 (a 9-wide contraction) stays float32.
  assert len(bf16) == 9, dots
  assert hlo.count('"__ynn_fusion"') >= 9
  # No dot in Eigen's transposed-operand form (a float32 weight gradient in a bfloat16
  # step runs on YNNPACK too: an Eigen dot among YNNPACK's costs thread hand-offs).
  assert not [line for _, line in dots if "lhs_contracting_dims={0}" in line], dots


@pytest.mark.cpu_only
@pytest.mark.slow
def test_auto_conv_impl_is_im2col_on_cpu_and_lax_conv_elsewhere(monkeypatch):
  from research.models import layers

  def layers_used():
    used = set()

    def record(next_fun, args, kwargs, context):
      used.add(type(context.module).__name__)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      CNN(num_classes=10).init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
    return used

  assert layers.resolve_impl("auto") == "im2col"  # these tests run on CPU
  assert "ConvReluPool" in layers_used() and "Conv" not in layers_used()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what an accelerator reports
  assert layers.resolve_impl("auto") == "xla" and layers.resolve_impl("im2col") == "im2col"
  assert "Conv" in layers_used() and "ConvReluPool" not in layers_used()
  with pytest.raises(ValueError, match="one of"):
    layers.resolve_impl("cudnn")


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("conv_impl", ["im2col", "xla"])
@pytest.mark.slow
def test_bfloat16_cnn_stays_close_to_float32(conv_impl):
  x = jax.random.uniform(jax.random.key(3), (4, 28, 28, 1))
  variables = CNN(num_classes=10).init(jax.random.key(0), x)
  full = CNN(num_classes=10, conv_impl=conv_impl).apply(variables, x)
  half = CNN(num_classes=10, conv_impl=conv_impl, dtype=jnp.bfloat16).apply(variables, x)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.05 * float(jnp.abs(full).max()))


def test_pool_stem_halves_the_resolution_of_every_stage():
  from research.models import resnet

  x = jnp.zeros((2, 28, 28, 1))
  for stem, first_stage in (("cifar", 28), ("pool", 14)):
    model = resnet.resnet8(num_classes=10, width=4, stem=stem)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: fast
    _, intermediates = jax.eval_shape(functools.partial(
        model.apply, capture_intermediates=True, mutable=["intermediates"]), variables, x)
    block = intermediates["intermediates"]["BasicBlock_0"]["__call__"][0]
    assert block.shape == (2, first_stage, first_stage, 4)
  odd = resnet.resnet8(num_classes=10, width=4, stem="pool")
  odd_input = jnp.zeros((1, 27, 27, 3))
  odd_variables = jax.eval_shape(odd.init, jax.random.key(0), odd_input)
  assert jax.eval_shape(odd.apply, odd_variables, odd_input).shape == (1, 10)


# ---- BatchNorm statistics over devices: model.bn_sync ------------------------------

_BN_SYNC_CHECK = """
import json
import jax, jax.numpy as jnp, numpy as np
from research import mesh as mesh_lib
from research.models import resnet

jax.config.update("jax_default_matmul_precision", "highest")
images = np.asarray(jax.random.normal(jax.random.key(1), (8, 8, 8, 3)))
mesh = mesh_lib.make_mesh()

# The same variables for both settings (bn_sync changes no parameter), made by one program.
variables = jax.jit(lambda: resnet.resnet8(num_classes=3, width=4).init(
    jax.random.key(0), jnp.zeros((1, 8, 8, 3))))()

def train_apply(bn_sync):
  model = resnet.resnet8(num_classes=3, width=4, bn_sync=bn_sync)
  apply = jax.jit(lambda batch: model.apply(variables, batch, train=True, mutable=["batch_stats"]))
  return lambda batch, sharded=True: jax.device_get(
      apply(mesh_lib.global_batch(batch, mesh) if sharded else batch))

one_device = train_apply("global")  # unsharded: the whole batch on the first device
whole = one_device(images, sharded=False)
shares = [one_device(images[2 * i:2 * i + 2], sharded=False) for i in range(4)]  # a device's
local = train_apply("local")(images)
difference = lambda a, b: float(max(np.abs(x - y).max() for x, y in
                                    zip(jax.tree.leaves(a), jax.tree.leaves(b))))
print(json.dumps({
    "devices": jax.device_count(),
    "global_vs_one_device": difference(train_apply("global")(images), whole),
    "local_vs_each_share": difference(local[0], np.concatenate([s[0] for s in shares])),
    "local_vs_one_device": difference(local[0], whole[0]),
    "local_running_vs_shares_mean": difference(
        local[1], jax.tree.map(lambda *s: np.mean(s, 0), *[s[1] for s in shares])),
    "same_tree": jax.tree.structure(local[1]) == jax.tree.structure(whole[1]),
}))
"""


@pytest.mark.slow
def test_bn_sync_global_is_the_whole_batch_and_local_each_devices_own_on_4_devices():
  """On 4 forced CPU devices, a batch of 8 (2 rows per device): "global" normalizes as one
  device with the whole batch; "local" as each device alone with its 2 rows, and its
  running averages are those of the 4 devices averaged."""
  result = subprocess.run(
      [sys.executable, "-c", _BN_SYNC_CHECK], cwd=REPO, capture_output=True, text=True,
      timeout=600, env=with_fast_compile({  # compared within tolerances, in one process
          **os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert found["devices"] == 4 and found["same_tree"]
  assert found["global_vs_one_device"] < 1e-5
  assert found["local_vs_each_share"] < 1e-5 and found["local_running_vs_shares_mean"] < 1e-5
  assert found["local_vs_one_device"] > 1e-2  # the two really differ


def test_bn_sync_is_a_knob_of_the_batchnorm_models_only():
  from research import models
  from research.errors import UserError

  assert models.defaults("resnet20")["bn_sync"] == "global"
  assert "bn_sync" in models.MODELS["wide_resnet"].knobs
  assert "bn_sync" not in models.MODELS["cnn"].knobs
  config = {"name": "resnet8", "bn_sync": "per_device"}
  with pytest.raises(UserError, match="model.bn_sync='per_device' is not accepted: one of "
                     "'global', 'local'"):
    models.build(ml_collections.ConfigDict(config), 10)
