"""Routing study: where BlackMamba's router sends tokens, and what Sinkhorn would change.

    python examples/routing_study.py                # the shipped Shakespeare model, held-out text
    python examples/routing_study.py Zyphra/BlackMamba-2.8B --text corpus.txt --tokens 50000 --dtype bfloat16

Each step below is a few lines that also run cell by cell in a notebook (the figures are
matplotlib Figures: a notebook shows them inline). Needs matplotlib (pip install matplotlib).
"""
import argparse
import os

import blackmamba as bm
from blackmamba.hub import embedded_heldout_text

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("model", nargs="?", default=None,
                help="checkpoint folder or hub id (default: the Shakespeare model shipped "
                     "with the package)")
ap.add_argument("--text", default=str(embedded_heldout_text()),
                help="corpus (default: the shipped model's held-out Tiny Shakespeare text)")
ap.add_argument("--tokens", type=int, default=50_000, help="tokens to run (default 50000)")
ap.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json")
ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
ap.add_argument("--out", default="routing_study", help="folder for the figures and data")
args = ap.parse_args()

# 1. Load a model. The default: 4.6M parameters, bytes in, 4 MoE layers of 8 experts.
model = bm.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
print(model)

# 2. One forward pass, traced: which expert every token went to, per MoE layer.
tr = bm.routing.trace(model, "To be, or not to be, that is the question:")
for layer in tr.layers:
    print(f"layer {layer}: experts {tr.expert_ids[layer].tolist()}")

# 3. Stream a corpus: statistics aggregate on the fly (fixed memory whatever the corpus).
st = bm.routing.collect(model, [args.text], max_tokens=args.tokens, batch_size=8, seq_len=256)
print(st.summary())

# 4. Which tokens each expert receives (the 5 most frequent, decoded).
last = st.layers[-1]
for expert, rows in enumerate(st.top_tokens(last, k=5)):
    shown = "  ".join(f"{text!r}:{count}" for _, text, count in rows)
    print(f"layer {last} expert {expert}: {shown}")

# 5. How often consecutive MoE layers pick related experts.
for a in st.agreement_summary():
    print(f"layers {a['layers']}: same index {a['same_index']:.1%}, NMI {a['nmi']:.3f}, "
          f"predictability {a['predictability']:.1%}")

# 6. Sinkhorn on the sampled router logits: iterations per init, balance before/after.
study = bm.routing.sinkhorn_study(st, inits=("blackmamba", "uniform"))
print(study.summary())

# 7. Figures and data files.
os.makedirs(args.out, exist_ok=True)
st.plot_expert_distribution(os.path.join(args.out, "expert_distribution.png"))
st.plot_load_balance(os.path.join(args.out, "load_balance.png"), study=study)
st.plot_positions(os.path.join(args.out, "positions.png"))
if st.agreement:
    st.plot_agreement(os.path.join(args.out, "agreement.png"))
study.plot(os.path.join(args.out, "sinkhorn_convergence.png"))
st.to_json(os.path.join(args.out, "routing_stats.json"))
st.to_csv(os.path.join(args.out, "routing_experts.csv"))
study.to_json(os.path.join(args.out, "sinkhorn.json"))
print(f"figures and data in {os.path.abspath(args.out)}")
