"""Float64 NumPy references for the update rules, written independently of `kernels.rules`."""

import numpy as np


def sgd(
    param,
    grad,
    buffer,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
    lr_folded=False,
):
    """One SGD step on float64 copies; returns ``(param, buffer)``."""
    d = -grad if maximize else grad.copy()
    if weight_decay:
        d = d + weight_decay * param
    if momentum == 0:
        return param - lr * d, buffer
    scale = lr if lr_folded else 1.0
    if first_step:
        buffer = scale * d
    else:
        buffer = momentum * buffer + (1 - dampening) * scale * d
    step = scale * d + momentum * buffer if nesterov else buffer
    return param - (1.0 if lr_folded else lr) * step, buffer


def adam(
    param, grad, m, v, vmax, *, step, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled
):
    """One Adam/AdamW step on float64 copies; returns ``(param, m, v, vmax)``."""
    beta1, beta2 = betas
    g = -grad if maximize else grad.copy()
    if decoupled:
        param = param * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * param
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if amsgrad:
        vmax = np.maximum(vmax, v)
    second = vmax if amsgrad else v
    denom = np.sqrt(second) / np.sqrt(1 - beta2**step) + eps
    return param - lr / (1 - beta1**step) * m / denom, m, v, vmax


def nadam(
    param,
    grad,
    m,
    v,
    mu_product,
    *,
    step,
    lr,
    betas,
    eps,
    weight_decay,
    momentum_decay,
    decoupled,
    maximize,
):
    """One NAdam step on float64 copies (Dozat's update as torch.optim.NAdam writes it);
    returns ``(param, m, v, mu_product)``."""
    beta1, beta2 = betas
    param, grad, m, v = (np.array(x, dtype=np.float64) for x in (param, grad, m, v))
    grad = -grad if maximize else grad
    if decoupled:
        param = param * (1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = mu_product * mu
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    denom = np.sqrt(v / (1 - beta2**step)) + eps
    param = param - lr * (1 - mu) / (1 - mu_product) * grad / denom
    param = param - lr * mu_next / (1 - mu_product * mu_next) * m / denom
    return param, m, v, mu_product


def radam(param, grad, m, v, *, step, lr, betas, eps, weight_decay, decoupled, maximize):
    """One RAdam step on float64 copies (Liu et al., 2020, with torch.optim.RAdam's
    weight decay); returns ``(param, m, v)``."""
    beta1, beta2 = betas
    param, grad, m, v = (np.array(x, dtype=np.float64) for x in (param, grad, m, v))
    grad = -grad if maximize else grad
    if decoupled:
        param = param * (1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat = m / (1 - beta1**step)
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    if rho <= 5:  # the variance of the adaptive step is intractable: momentum alone
        return param - lr * m_hat, m, v
    r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    adaptive = np.sqrt(1 - beta2**step) / (np.sqrt(v) + eps)
    return param - lr * m_hat * r * adaptive, m, v


def adamax(param, grad, m, u, *, step, lr, betas, eps, weight_decay, maximize):
    """One Adamax step on float64 copies (Kingma & Ba, 2015, section 7.1, with
    torch.optim.Adamax's ε inside the maximum); returns ``(param, m, u)``."""
    beta1, beta2 = betas
    param, grad, m, u = (np.array(x, dtype=np.float64) for x in (param, grad, m, u))
    grad = (-grad if maximize else grad) + weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    u = np.maximum(beta2 * u, np.abs(grad) + eps)
    return param - lr / (1 - beta1**step) * m / u, m, u


def rmsprop(
    param, grad, square_avg, buffer, grad_avg, *, lr, alpha, eps, weight_decay, momentum,
    centered, maximize,
):  # fmt: skip
    """One RMSprop step on float64 copies; returns ``(param, square_avg, buffer, grad_avg)``."""
    param, grad, square_avg, buffer, grad_avg = (
        np.array(x, dtype=np.float64) for x in (param, grad, square_avg, buffer, grad_avg)
    )
    grad = (-grad if maximize else grad) + weight_decay * param
    square_avg = alpha * square_avg + (1 - alpha) * grad * grad
    if centered:
        grad_avg = alpha * grad_avg + (1 - alpha) * grad
        average = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        average = np.sqrt(square_avg) + eps
    if momentum > 0:
        buffer = momentum * buffer + grad / average
        param = param - lr * buffer
    else:
        param = param - lr * grad / average
    return param, square_avg, buffer, grad_avg


def adagrad(param, grad, state_sum, *, step, lr, lr_decay, weight_decay, eps, maximize):
    """One Adagrad step on float64 copies; returns ``(param, state_sum)``."""
    param, grad, state_sum = (np.array(x, dtype=np.float64) for x in (param, grad, state_sum))
    grad = (-grad if maximize else grad) + weight_decay * param
    state_sum = state_sum + grad * grad
    step_size = lr / (1 + (step - 1) * lr_decay)
    return param - step_size * grad / (np.sqrt(state_sum) + eps), state_sum


def lamb(param, grad, m, v, *, step, lr, betas, eps, weight_decay, bias_correction, maximize):
    """One LAMB step of one layer on float64 copies (You et al., 2019, Algorithm 2);
    returns ``(param, m, v, trust_ratio)``."""
    beta1, beta2 = betas
    param, grad, m, v = (np.array(x, dtype=np.float64) for x in (param, grad, m, v))
    grad = -grad if maximize else grad
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat, v_hat = (m / (1 - beta1**step), v / (1 - beta2**step)) if bias_correction else (m, v)
    update = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * param
    param_norm, update_norm = np.linalg.norm(param), np.linalg.norm(update)
    ratio = param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
    return param - lr * ratio * update, m, v, ratio


def lion(param, grad, m, *, lr, betas, weight_decay, maximize):
    """One Lion step on float64 copies (Chen et al., 2023, Program 1, as lion-pytorch
    orders it: decay, update, momentum); ``sign(0) = 0``, ``sign(NaN)`` NaN. Returns
    ``(param, m, interpolation)``, the last the value whose sign was taken."""
    beta1, beta2 = betas
    param, grad, m = (np.array(x, dtype=np.float64) for x in (param, grad, m))
    grad = -grad if maximize else grad
    param = param * (1 - lr * weight_decay)
    interpolation = beta1 * m + (1 - beta1) * grad
    param = param - lr * np.sign(interpolation)
    m = beta2 * m + (1 - beta2) * grad
    return param, m, interpolation
