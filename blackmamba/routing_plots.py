"""Figures for blackmamba.routing (matplotlib, the optional `plot` extra).

Every function builds a matplotlib Figure without pyplot (no global figure list, no GUI
backend needed; a notebook still shows the returned Figure), saves it when given a path, and
returns it. Panels carry labels for the tests: Axes.get_label() is "heatmap", "bars:<layer>",
"positions:<layer>", "agreement:<a>-<b>", "convergence", "iterations", "balance",
"entropy", "cv", "max_over_mean".
"""
import math

import numpy as np

from .routing import balance, agreement_stats, bucket_labels

INIT_COLORS = {"blackmamba": "#d62728", "uniform": "#1f77b4"}
INIT_NAMES = {"blackmamba": "BlackMamba init", "uniform": "uniform (vanilla) init"}


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("routing figures need matplotlib: pip install 'blackmamba[plot]' "
                          "(or pip install matplotlib)") from None
    return Figure(figsize=figsize, layout="constrained")


def _save(fig, path, dpi=110):
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _title(st, what):
    name = f" — {st.model_name}" if st.model_name else ""
    return f"{what}{name} ({st.num_tokens:,} tokens)"


def _grid(n, ncols_max=4):
    ncols = min(ncols_max, n)
    return math.ceil(n / ncols), ncols


def plot_expert_distribution(st, path=None, figsize=None, annotate=None):
    layers = st.layers
    n, Xmax = len(layers), max(st.num_experts.values())
    load = np.full((n, Xmax), np.nan)                       # (layers, experts): load / mean
    for r, l in enumerate(layers):
        load[r, :st.num_experts[l]] = st.fractions(l) * st.num_experts[l]
    fig = _figure(figsize or (12, 1.6 + 0.62 * max(n, 3)))
    gs = fig.add_gridspec(n, 2, width_ratios=[1.1, 1.0])
    from matplotlib.colors import TwoSlopeNorm
    ax = fig.add_subplot(gs[:, 0], label="heatmap")
    vmax = max(2.0, float(np.nanmax(load)) if np.isfinite(load).any() else 2.0)
    im = ax.imshow(load, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax))
    if annotate is None:
        annotate = n * Xmax <= 160
    if annotate:
        for r in range(n):
            for x in range(Xmax):
                if np.isfinite(load[r, x]):
                    dark = abs(load[r, x] - 1.0) > 0.45 * (vmax - 1.0)
                    ax.text(x, r, f"{load[r, x]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    ax.set_xticks(range(Xmax))
    ax.set_yticks(range(n), [str(l) for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (index in the model)")
    ax.set_title("Load per expert / mean load (1 = balanced)")
    fig.colorbar(im, ax=ax, label="tokens routed / (tokens / X)", shrink=0.9)
    ymax = max(float(np.nanmax(load / Xmax)) if np.isfinite(load).any() else 0, 1e-9)
    first = None
    for r, l in enumerate(layers):
        X = st.num_experts[l]
        b = fig.add_subplot(gs[r, 1], label=f"bars:{l}", sharex=first)
        first = first or b
        frac = st.fractions(l)
        cv = balance(st.counts[l])["cv"]
        b.bar(range(X), frac, color="#4c72b0", width=0.8)
        b.axhline(1.0 / X, color="0.3", ls="--", lw=1)
        b.set_ylim(0, 1.12 * max(ymax, 1.0 / X))
        b.set_ylabel(f"L{l}", rotation=0, ha="right", va="center")
        b.text(0.995, 0.92, f"CV {cv:.2f}", transform=b.transAxes, ha="right", va="top",
               fontsize=8)
        b.tick_params(labelsize=7)
        if r == 0:
            b.set_title("Fraction of tokens per expert (dashed: uniform 1/X)")
        if r < n - 1:
            b.tick_params(labelbottom=False)
        else:
            b.set_xlabel("expert")
            b.set_xticks(range(Xmax))
    fig.suptitle(_title(st, "Expert token distribution per MoE layer"))
    return _save(fig, path)


def plot_load_balance(st, path=None, study=None, figsize=None):
    layers = st.layers
    bal = [balance(st.counts[l]) for l in layers]
    fig = _figure(figsize or (12, 3.6))
    specs = [("entropy", "normalised entropy", 1.0, "Routing entropy (1 = even)"),
             ("cv", "coefficient of variation", 0.0, "Coefficient of variation (0 = even)"),
             ("max_over_mean", "max load / mean load", 1.0, "Busiest expert (1 = even)")]
    x = np.arange(len(layers))
    for i, (key, ylabel, ref, title) in enumerate(specs):
        ax = fig.add_subplot(1, 3, i + 1, label=key)
        ax.plot(x, [b[key] for b in bal], "o-", color="k", label="argmax (as run)")
        if study is not None and key != "entropy":
            for init in study.inits:
                ys = [study.results[l][init]["after"][key] if l in study.results else np.nan
                      for l in layers]
                ax.plot(x, ys, "s--", color=INIT_COLORS.get(init), ms=4,
                        label=f"Sinkhorn, {INIT_NAMES.get(init, init)}")
        ax.axhline(ref, color="0.6", ls=":", lw=1)
        ax.set_xticks(x, [str(l) for l in layers])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if key == "entropy":
            ax.set_ylim(min(0.5, np.nanmin([b[key] for b in bal]) - 0.05), 1.02)
        if i == 2 and study is not None:
            ax.legend(fontsize=7)
    fig.suptitle(_title(st, "Load balance by layer"))
    return _save(fig, path)


def plot_positions(st, path=None, figsize=None):
    layers = st.layers
    nr, nc = _grid(len(layers))
    fig = _figure(figsize or (3.3 * nc + 1.2, 2.8 * nr + 0.8))
    labels = bucket_labels(st.position_edges)
    im = None
    axes = []
    for i, l in enumerate(layers):
        ax = fig.add_subplot(nr, nc, i + 1, label=f"positions:{l}")
        pf = st.position_fractions(l)                      # (P, X)
        im = ax.imshow(pf.T, aspect="auto", cmap="viridis", vmin=0,
                       vmax=max(0.5, float(np.nanmax(pf)) if np.isfinite(pf).any() else 0.5),
                       interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_yticks(range(st.num_experts[l]))
        ax.set_xlabel("position in sequence")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {l}")
        axes.append(ax)
    fig.colorbar(im, ax=axes, label="fraction of the bucket's tokens", shrink=0.9)
    fig.suptitle(_title(st, "Routing by position"))
    return _save(fig, path)


def plot_agreement(st, path=None, figsize=None):
    pairs = list(st.agreement)
    if not pairs:
        raise ValueError("one MoE layer only: no consecutive pairs to compare")
    nr, nc = _grid(len(pairs))
    fig = _figure(figsize or (3.4 * nc + 1.2, 3.2 * nr + 0.8))
    axes, im = [], None
    with np.errstate(invalid="ignore", divide="ignore"):
        vmax = max([0.25] + [float(np.nanmax(J / J.sum(1, keepdims=True)))
                             for J in st.agreement.values() if J.sum()])
    for i, (a, b) in enumerate(pairs):
        J = st.agreement[(a, b)].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            cond = J / J.sum(1, keepdims=True)
        ag = agreement_stats(J)
        ax = fig.add_subplot(nr, nc, i + 1, label=f"agreement:{a}-{b}")
        im = ax.imshow(cond, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xlabel(f"expert in layer {b}")
        ax.set_ylabel(f"expert in layer {a}")
        ax.set_title(f"{a}→{b}: same {ag['same_index']:.0%}, NMI {ag['nmi']:.2f}", fontsize=9)
        axes.append(ax)
    fig.colorbar(im, ax=axes, label="P(expert in next layer | expert here)", shrink=0.9)
    fig.suptitle(_title(st, "Consecutive MoE layers"))
    return _save(fig, path)


def plot_sinkhorn(study, path=None, figsize=None):
    fig = _figure(figsize or (16, 5.2))
    layers = study.layers
    x = np.arange(len(layers))
    for k, (key, ylabel, title) in enumerate((
            ("curve", "mean |d1 − d1_prev|", "Convergence, released rule"),
            ("marginal_curve", "mean |T·rowsum(P) − 1|", "Convergence, marginal error"))):
        ax = fig.add_subplot(1, 4, k + 1, label="convergence" if k == 0 else "marginal")
        for init in study.inits:
            for j, l in enumerate(layers):
                c = study.results[l][init][key]
                ax.plot(range(1, len(c) + 1), c, "o-", ms=3, lw=1, alpha=0.75,
                        color=INIT_COLORS.get(init),
                        label=INIT_NAMES.get(init, init) if j == 0 else None)
        ax.axhline(study.tol, color="0.4", ls="--", lw=1, label=f"tol {study.tol:g}")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (a line per layer)", fontsize=10)
        ax.legend(fontsize=7)

    ax = fig.add_subplot(1, 4, 3, label="iterations")
    w = 0.8 / max(1, len(study.inits))
    for k, init in enumerate(study.inits):
        off = x + (k - (len(study.inits) - 1) / 2) * w
        ax.bar(off, [study.results[l][init]["iterations"] for l in layers], w,
               color=INIT_COLORS.get(init), label=f"{INIT_NAMES.get(init, init)}: released")
        ax.plot(off, [study.results[l][init]["iterations_marginal"] for l in layers], "_",
                ms=12, mew=2, color="k" if k == 0 else "0.45",
                label=f"{INIT_NAMES.get(init, init)}: marginal <= tol")
    ax.set_xticks(x, [str(l) for l in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("iterations to converge")
    ax.set_title("Iterations (bars: ops.sinkhorn)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=1)

    ax = fig.add_subplot(1, 4, 4, label="balance")
    first = study.inits[0]
    ax.plot(x, [study.results[l][first]["before"]["max_over_mean"] for l in layers], "o-",
            color="k", label="argmax (no Sinkhorn)")
    for init in study.inits:
        c = INIT_COLORS.get(init)
        ax.plot(x, [study.results[l][init]["after"]["max_over_mean"] for l in layers], "s--",
                color=c, label=f"{INIT_NAMES.get(init, init)}, released stop")
        ax.plot(x, [study.results[l][init]["converged"]["max_over_mean"] for l in layers],
                "^:", color=c, alpha=0.6,
                label=f"{INIT_NAMES.get(init, init)}, marginals balanced (or stalled)")
    ax.axhline(1.0, color="0.6", ls=":", lw=1)
    ax.set_xticks(x, [str(l) for l in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("max load / mean load")
    ax.set_title("Balance before / after Sinkhorn", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=1)
    T = sorted(set(study.num_tokens.values()))
    fig.suptitle(f"Sinkhorn routing on {'/'.join(f'{t:,}' for t in T)} router-logit rows "
                 "per layer")
    return _save(fig, path)
