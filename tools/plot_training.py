"""Figure of the default model's training log (tools/train_default_model.py's train_log.json).

    python3 tools/plot_training.py docs/default_model/train_log.json docs/default_model_training.png \
        [--compare docs/default_model/run1-no-dropout/train_log.json]

Top left: training loss and held-out/validation bits per byte. Top right: routing balance per
MoE layer (normalised entropy of the argmax expert counts: 1 = perfectly even) and how often
Sinkhorn's choice equals the router's argmax. Bottom: each MoE layer's share of tokens per
expert at several points of training (argmax routing, the inference rule).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blackmamba.routing import balance  # noqa: E402  normalised entropy of expert counts


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("out")
    ap.add_argument("--compare", help="another run's train_log.json (held-out curve only)")
    ap.add_argument("--points", type=int, default=6, help="snapshots in the bottom row")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.load(open(args.log))
    ev = log["eval"]
    layers = sorted(ev[0]["argmax"]["expert_counts"], key=int)
    X = len(ev[0]["argmax"]["expert_counts"][layers[0]])
    fig = plt.figure(figsize=(12, 7.5), constrained_layout=True)
    gs = fig.add_gridspec(2, len(layers))
    ax = fig.add_subplot(gs[0, :len(layers) // 2])
    tr = log["train"]
    steps = np.array([t["step"] for t in tr])
    loss = np.array([t["loss"] for t in tr]) / math.log(2)
    k = 5
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, color="0.6", lw=1, label="train (dropout on, smoothed)")
    es = [e["step"] for e in ev]
    ax.plot(es, [e["validation"]["bits_per_byte"] for e in ev], "o-", ms=3,
            label="validation (picks the checkpoint)")
    ax.plot(es, [e["argmax"]["bits_per_byte"] for e in ev], "s-", ms=3,
            label="held-out, argmax routing (shipped)")
    ax.plot(es, [e["sinkhorn"]["bits_per_byte"] for e in ev], ":", lw=1.5,
            label="held-out, Sinkhorn routing")
    if args.compare:
        other = json.load(open(args.compare))
        ax.plot([e["step"] for e in other["eval"]],
                [e["argmax"]["bits_per_byte"] for e in other["eval"]], "--", color="C3", lw=1,
                label="held-out, run without dropout")
    shipped = log.get("shipped_eval")
    if shipped:
        ax.axhline(shipped["argmax"]["bits_per_byte"], color="C1", lw=0.5)
    ax.set_ylim(1.0, 4.0)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{log['parameters'] / 1e6:.1f}M-parameter BlackMamba on Tiny Shakespeare")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(gs[0, len(layers) // 2:])
    for i, l in enumerate(layers):
        ax.plot(es, [balance(e["argmax"]["expert_counts"][l])["entropy"] for e in ev], "-",
                color=f"C{i}", label=f"layer {l}: balance (argmax)")
        ax.plot(es, [e["sinkhorn"]["agreement_with_argmax"][l] for e in ev], ":",
                color=f"C{i}", label=f"layer {l}: Sinkhorn = argmax")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("routing: normalised entropy of expert counts; Sinkhorn/argmax agreement")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)

    pick = np.unique(np.linspace(0, len(ev) - 1, args.points).round().astype(int))
    cmap = plt.get_cmap("tab10")
    for j, l in enumerate(layers):
        ax = fig.add_subplot(gs[1, j])
        bottom = np.zeros(len(pick))
        shares = np.array([np.asarray(ev[p]["argmax"]["expert_counts"][l], float) /
                           sum(ev[p]["argmax"]["expert_counts"][l]) for p in pick])
        for x in range(X):
            ax.bar(range(len(pick)), shares[:, x], bottom=bottom, color=cmap(x % 10),
                   label=f"expert {x}")
            bottom += shares[:, x]
        ax.set_xticks(range(len(pick)), [str(ev[p]["step"]) for p in pick], fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(f"layer {l}: share of tokens per expert", fontsize=9)
        if j == 0:
            ax.set_ylabel("fraction of held-out tokens")
        if j == len(layers) - 1:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
