"""NumPy float64 references for every op of the C core (SPEC sections 2, 3, 3.2).

Slow and plain on purpose: each function is the math of the SPEC written directly, the twin
that tests compare the fast kernels against. Shapes follow csrc/bm.h (token-major).
"""
import math

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def softplus(v):
    v = _f64(v)
    return np.where(v > 20.0, v, np.log1p(np.exp(np.minimum(v, 20.0))))


def silu(v):
    v = _f64(v)
    return v / (1.0 + np.exp(-v))


def gelu(v):
    v = _f64(v)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))


def gelu_tanh(v):
    v = _f64(v)
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu, None: lambda v: _f64(v)}


def bf16_to_f32(a):
    """uint16 bfloat16 bits -> float32."""
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a):
    """float32 -> uint16 bfloat16 bits, round to nearest even, NaN kept NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded).astype(np.uint16)


def weight_f64(w):
    """A weight stored as float32 or as bf16 bits (uint16), as float64."""
    w = np.asarray(w)
    return bf16_to_f32(w).astype(np.float64) if w.dtype == np.uint16 else w.astype(np.float64)


def linear(x, W, bias=None):
    """y (..., Nout) = x (..., Kin) @ W (Nout, Kin)^T + bias."""
    y = _f64(x) @ weight_f64(W).T
    return y if bias is None else y + _f64(bias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   state=None):
    """u, delta, z (b, L, E); A (E, N); B, C (b, L, N); state (b, E, N) -> (y, final_state)."""
    u, delta, A, B, C = map(_f64, (u, delta, A, B, C))
    b, L, E = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + _f64(delta_bias)
    if delta_softplus:
        delta = softplus(delta)
    h = np.zeros((b, E, N)) if state is None else _f64(state).copy()
    y = np.empty((b, L, E))
    for t in range(L):
        dA = np.exp(delta[:, t, :, None] * A[None])                       # (b, E, N)
        h = dA * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        y[:, t] = np.einsum("ben,bn->be", h, C[:, t])
    if D is not None:
        y = y + u * _f64(D)
    if z is not None:
        y = y * silu(z)
    return y, h


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=True):
    """One token: state (b, E, N), x/delta/z (b, E), B/C (b, N) -> (y (b, E), new_state)."""
    y, h = selective_scan(_f64(x)[:, None], _f64(delta)[:, None], A, _f64(B)[:, None],
                          _f64(C)[:, None], D, None if z is None else _f64(z)[:, None],
                          delta_bias, delta_softplus, state)
    return y[:, 0], h


def causal_conv1d(x, weight, bias=None, conv_state=None, activation="silu"):
    """x (b, L, E); weight (E, K) or (E, 1, K); conv_state (b, K-1, E) -> (y, final_conv_state)."""
    x = _f64(x)
    w = _f64(weight).reshape(x.shape[2], -1)
    K = w.shape[1]
    b, L, E = x.shape
    prev = np.zeros((b, K - 1, E)) if conv_state is None else _f64(conv_state)
    xp = np.concatenate([prev, x], axis=1)                                 # (b, K-1+L, E)
    y = np.zeros((b, L, E))
    for k in range(K):
        y += w[:, k] * xp[:, k:k + L]
    if bias is not None:
        y += _f64(bias)
    if activation == "silu":
        y = silu(y)
    return y, xp[:, xp.shape[1] - (K - 1):].copy()


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    """One token: x (b, E), conv_state (b, K-1, E) -> (y (b, E), new_conv_state)."""
    y, st = causal_conv1d(_f64(x)[:, None], weight, bias, conv_state, activation)
    return y[:, 0], st


def rms_norm(x, weight, residual=None, eps=1e-5):
    """-> (RMSNorm(x + residual) * weight, x + residual)."""
    r = _f64(x) if residual is None else _f64(x) + _f64(residual)
    out = r / np.sqrt(np.mean(r * r, axis=-1, keepdims=True) + eps) * _f64(weight)
    return out, r


def layer_norm(x, weight, bias=None, residual=None, eps=1e-5):
    r = _f64(x) if residual is None else _f64(x) + _f64(residual)
    mu = r.mean(axis=-1, keepdims=True)
    var = ((r - mu) ** 2).mean(axis=-1, keepdims=True)
    out = (r - mu) / np.sqrt(var + eps) * _f64(weight)
    return out if bias is None else out + _f64(bias)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-_f64(v)))


def route_top1(x, router_weight, router_bias):
    """x (T, d) -> (expert_ids (T) int, gates (T), logits (T, X))."""
    logits = linear(x, router_weight, router_bias)
    ids = np.argmax(logits, axis=-1)                                       # ties -> lowest
    gates = sigmoid(np.take_along_axis(logits, ids[:, None], axis=-1)[:, 0])
    return ids, gates, logits


def moe_dispatch(ids, num_experts):
    ids = np.asarray(ids)
    counts = np.bincount(ids, minlength=num_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    perm = np.argsort(ids, kind="stable")
    return counts, offsets, perm


def gated_mlp(x, fc1, fc2, activation="gelu", gated=True):
    """x (T, d); fc1 (2F, d) (or (F, d) if not gated); fc2 (d, F)."""
    a = linear(x, fc1)
    if gated:
        F = a.shape[-1] // 2
        a = ACTIVATIONS[activation](a[..., :F]) * a[..., F:]
    else:
        a = ACTIVATIONS[activation](a)
    return linear(a, fc2)


def moe_experts(x, ids, gates, fc1, fc2, activation="gelu"):
    x = _f64(x)
    out = np.zeros_like(x)
    for e in range(np.asarray(fc1).shape[0]):
        rows = np.nonzero(np.asarray(ids) == e)[0]
        if rows.size:
            out[rows] = gated_mlp(x[rows], fc1[e], fc2[e], activation)
    return out if gates is None else out * _f64(gates)[:, None]


def moe(x, router_w, router_b, fc1, fc2, activation="gelu"):
    """x (T, d) -> (out (T, d), ids, gates, logits)."""
    ids, gates, logits = route_top1(x, router_w, router_b)
    return moe_experts(x, ids, gates, fc1, fc2, activation), ids, gates, logits


def sinkhorn(logits, tol=1e-4, init="blackmamba", max_iters=1000):
    """SPEC 3.2 -> (P (T, X), iterations).

    init="blackmamba": C = exp(2 S), d1 = 1 / (X colsum(C)) (the released code).
    init="uniform": vanilla Megatron, C = exp(S), d1 = ones (golden: 6 iterations).
    """
    S = _f64(logits)
    T, X = S.shape
    Cm = np.exp(2.0 * S) if init == "blackmamba" else np.exp(S)
    d0 = np.ones(T)
    d1 = 1.0 / (X * Cm.sum(axis=0)) if init == "blackmamba" else np.ones(X)
    it = 0
    while it < max_iters:
        it += 1
        d1_prev = d1
        d0 = (1.0 / T) / (Cm @ d1 + 1e-8)
        d1 = (1.0 / X) / (Cm.T @ d0 + 1e-8)
        if np.mean(np.abs(d1 - d1_prev)) <= tol:
            break
    return d0[:, None] * Cm * d1[None, :], it
