"""What the 8-bit state tests share: awkward values for the code maps, and NumPy float32
references of one 8-bit Adam and SGD-momentum step from decoded state (each in its
rule's order), with the options they are checked at."""

import numpy as np

from fastmomentum import quantized
from fastmomentum.kernels import quantization, rules

BLOCK = quantization.BLOCK

SGD_STATE_KEYS = quantized.keys(("momentum_buffer",))


def awkward(size, seed):
    """Values of many magnitudes and both signs, with zeros, in blocks of various spreads."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(size) * np.exp(3 * rng.standard_normal(size))
    values[rng.random(size) < 0.05] = 0
    return values.astype(np.float32)


def reference_step(param, grad, codes, step, lr, betas, eps, weight_decay, decoupled, maximize):
    """One 8-bit Adam step in NumPy float32, in `rules.adam`'s order, from decoded
    moments; returns the new param and the new (codes, absmax) of both moments."""
    dtype = np.dtype(np.float32)
    beta1, beta1_c, beta2, beta2_c, eps, factor, l2, decay = rules.adam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled, maximize
    )
    step_size, correction2 = rules.adam.step_coefficients(dtype, step, lr, betas)
    m = quantization.dequantize(codes[0], codes[1])
    v = quantization.dequantize(codes[2], codes[3])
    param = param * decay
    grad = factor * grad
    if l2 != 0:
        grad = grad + l2 * param
    m = m + beta1_c * (grad - m) if beta1_c < beta1 else grad - (grad - m) * beta1
    v = v * beta2 + beta2_c * grad * grad
    param = param + step_size * m / (np.sqrt(v) / correction2 + eps)
    return param, (*quantization.quantize(m, True), *quantization.quantize(v, False))


def assert_codes_agree(actual, expected):
    """Codes equal but for values on a rounding boundary: at most one level apart, rarely."""
    differ = actual != expected
    assert differ.sum() <= 2e-3 * differ.size
    assert (np.abs(actual.astype(np.int32) - expected.astype(np.int32))[differ] <= 1).all()


def empty_state(size):
    blocks = quantization.blocks(size)
    return [np.zeros(size, np.int8), np.zeros(blocks, np.float32)] + [
        np.zeros(size, np.uint8),
        np.zeros(blocks, np.float32),
    ]


OPTIONS = [
    {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "decoupled": True,
     "maximize": False},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01, "decoupled": False,
     "maximize": True},
]  # fmt: skip


def reference_sgd_step(param, grad, codes, first, lr, momentum, dampening, weight_decay,
                        nesterov, maximize, convention):  # fmt: skip
    """One SGD-momentum step in NumPy float32, in `rules.sgd.momentum`'s order, from the
    decoded buffer; returns the new param and the buffer's new (codes, absmax)."""
    mu, kept, factor, l2, velocity_scale, update_scale = rules.sgd.momentum_coefficients(
        np.dtype(np.float32), lr, momentum, dampening, weight_decay, maximize, convention
    )
    direction = factor * grad
    if l2 != 0:
        direction = direction + l2 * param
    direction = velocity_scale * direction
    if first:
        velocity = direction
    else:
        velocity = mu * quantization.dequantize(*codes) + kept * direction
    step = direction + mu * velocity if nesterov else velocity
    return param - update_scale * step, quantization.quantize(velocity, True)


SGD_OPTIONS = [
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.01, "nesterov": True,
     "maximize": False, "convention": "pytorch"},
    {"lr": 0.02, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.0, "nesterov": False,
     "maximize": True, "convention": "lr_folded"},
]  # fmt: skip
