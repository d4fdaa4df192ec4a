"""Train the embedded default model: a small byte-level BlackMamba on Tiny Shakespeare.

A dev tool (PyTorch, run on a GPU machine; CPU works for smoke tests), never imported by the
package. The model is exactly SPEC.md's architecture: Mamba layers alternating with top-1 MoE
layers, residual stream in float32, final LayerNorm with bias, LM head tied to the embedding.
Routing during training is the released recipe (SPEC 3.2): each MoE layer's expert is chosen by
Sinkhorn on the detached router logits (BlackMamba's initialisation, C = exp(2 S)), computed by
blackmamba's own kernel (`blackmamba.ops.sinkhorn`: the GPU op on CUDA tensors through
DLPack/CAI, the C op on CPU tensors), and the gate is sigmoid of the chosen logit, so the router
learns through the gate. At inference (eval mode here, and the package) the expert is the
argmax of the logits, as in the released code.

    python3 tools/train_default_model.py --out blackmamba/models/shakespeare \
        --log benchmarks/results/default-model --time-budget 360

Writes to --out: config.json, pytorch_model.bin (torch.save of {"model": OrderedDict} with
bfloat16 tensors, the released format) and to --log: train_log.json (loss curves, expert
distributions per layer at several points, Sinkhorn iteration counts), reference_logits.npz
(this framework's forward pass on the shipped bf16 weights, float32 on the CPU: what the
package must reproduce to 1e-4).
"""
import argparse
import collections
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from blackmamba import ops  # noqa: E402  the project's Sinkhorn kernel (C or CUDA)


# ---- the model (SPEC 1-3) --------------------------------------------------------------------

def pscan(a, b):
    """h_t = a_t * h_{t-1} + b_t along dim 1 with h_{-1} = 0 (Hillis-Steele, log2(L) steps).

    a, b: (B, L, E, N). Every step composes (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2): only
    products of decays in (0, 1], so it is as stable as the sequential loop (no exp of cumsums).
    """
    L = a.shape[1]
    k = 1
    while k < L:
        b = torch.cat([b[:, :k], torch.addcmul(b[:, k:], a[:, k:], b[:, :-k])], dim=1)
        if 2 * k < L:
            a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Mamba(nn.Module):
    def __init__(self, d, E, N, K, R, n_layers):
        super().__init__()
        self.E, self.N, self.K, self.R = E, N, K, R
        self.in_proj = nn.Linear(d, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d, bias=False)
        # Mamba's initialisation: S4D-real A, dt in [1e-3, 1e-1] log-uniform, D = 1
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32))
                                  .repeat(E, 1).contiguous())
        self.D = nn.Parameter(torch.ones(E))
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
            self.out_proj.weight.mul_(1.0 / math.sqrt(n_layers))

    def forward(self, u):                                   # u (B, L, d)
        Bsz, L, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)             # (B, L, E) each
        xc = F.silu(self.conv1d(x.transpose(1, 2))[..., :L]).transpose(1, 2)
        dt_r, Bt, Ct = torch.split(self.x_proj(xc), [self.R, self.N, self.N], dim=-1)
        delta = F.softplus(self.dt_proj(dt_r))              # (B, L, E); threshold 20 as SPEC
        A = -torch.exp(self.A_log)                          # (E, N)
        dA = torch.exp(delta.unsqueeze(-1) * A)             # (B, L, E, N)
        dBx = (delta * xc).unsqueeze(-1) * Bt.unsqueeze(2)  # (B, L, E, N)
        h = pscan(dA, dBx)
        y = torch.einsum("blen,bln->ble", h, Ct) + self.D * xc
        return self.out_proj(y * F.silu(z))


def sinkhorn_experts(logits):
    """Expert per token chosen by Sinkhorn (SPEC 3.2, BlackMamba init) through blackmamba's
    kernel; returns (ids (T,) int64, iterations)."""
    S = logits.detach().float().contiguous()
    if S.is_cuda:
        P, iters = ops.sinkhorn(S, tol=1e-4, init="blackmamba")     # DLPack/CAI, on the GPU
        P = torch.from_dlpack(P)
    else:
        P, iters = ops.sinkhorn(S.numpy(), tol=1e-4, init="blackmamba")
        P = torch.from_numpy(P)
    return P.argmax(-1), int(iters)


class MoE(nn.Module):
    def __init__(self, d, F_, X):
        super().__init__()
        self.X, self.F = X, F_
        self.router = nn.Linear(d, X, bias=True)
        self.fc1 = nn.Parameter(torch.randn(X, 2 * F_, d) * d ** -0.5)
        self.fc2 = nn.Parameter(torch.randn(X, d, F_) * F_ ** -0.5)
        self.routing = "argmax"           # "sinkhorn" while training
        self.last = None                  # (ids, iterations) of the last call, for the log

    def forward(self, x):                                   # x (B, L, d)
        shp = x.shape
        x = x.reshape(-1, shp[-1])                          # (T, d)
        s = self.router(x)                                  # (T, X)
        if self.routing == "sinkhorn":
            ids, iters = sinkhorn_experts(s)
        else:
            ids, iters = s.argmax(-1), 0
        self.last = (ids.detach(), iters, s.detach().argmax(-1))
        g = torch.sigmoid(s.gather(1, ids[:, None]))       # (T, 1): gate of the chosen logit
        out = torch.empty_like(x)
        for e in range(self.X):                             # gather / GEMM / scatter per expert
            rows = torch.nonzero(ids == e, as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            a = x[rows] @ self.fc1[e].t()                   # (n, 2F): [gate half | up half]
            a = F.gelu(a[:, :self.F]) * a[:, self.F:]       # exact (erf) GELU, SPEC 3
            out = out.index_put((rows,), (a @ self.fc2[e].t()) * g[rows])
        return out.reshape(shp)


class BlackMamba(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, V = cfg["hidden_size"], cfg["vocab_size"]
        E = cfg["expansion_factor"] * d
        R = cfg["dt_rank"]
        kinds = cfg["mamba_moe_layers"]
        self.embedding = nn.Embedding(V, d)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(d)) for _ in kinds])
        self.mixers = nn.ModuleList([
            Mamba(d, E, cfg["state_size"], cfg["conv_dimension"], R, len(kinds)) if k == "r"
            else MoE(d, cfg["ffn_hidden_size"], int(k)) for k in kinds])
        self.final_norm = nn.LayerNorm(d, eps=1e-5)
        self.dropout = cfg.get("_dropout", 0.0)     # training only: on each mixer's output

    def moe_layers(self):
        return [(i, m) for i, m in enumerate(self.mixers) if isinstance(m, MoE)]

    def set_routing(self, how):
        for _, m in self.moe_layers():
            m.routing = how

    def forward(self, ids):                                 # ids (B, L) int64
        h = F.dropout(self.embedding(ids), self.dropout, self.training)
        r = None
        for w, mixer in zip(self.norms, self.mixers):
            r = h if r is None else h + r                   # residual in float32
            h = F.dropout(mixer(rms_norm(r, w)), self.dropout, self.training)
        y = self.final_norm(h + r)
        return y @ self.embedding.weight.t()                # tied head

    # the released key names (SPEC 5)
    def released_state_dict(self):
        sd = collections.OrderedDict()
        sd["embedding.word_embeddings.weight"] = self.embedding.weight
        for i, (w, m) in enumerate(zip(self.norms, self.mixers)):
            p = f"decoder.layers.{i}."
            sd[p + "norm.weight"] = w
            if isinstance(m, Mamba):
                for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                             "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"):
                    sd[p + "mixer." + name] = m.get_parameter(name)
            else:
                sd[p + "mixer.router.weight"] = m.router.weight
                sd[p + "mixer.router.bias"] = m.router.bias
                for e in range(m.X):
                    sd[p + f"mixer.local_experts.{e}.linear_fc1.weight"] = m.fc1[e]
                    sd[p + f"mixer.local_experts.{e}.linear_fc2.weight"] = m.fc2[e]
        sd["decoder.final_layernorm.weight"] = self.final_norm.weight
        sd["decoder.final_layernorm.bias"] = self.final_norm.bias
        return sd


def round_to_bf16_(model):
    """Round every weight to bfloat16 in place (what the shipped file holds)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


# ---- data -------------------------------------------------------------------------------------

def load_split(path, heldout_fraction, val_fraction):
    """train | validation (picks the checkpoint) | held-out (the last heldout_fraction: the
    reported number; never used for any choice)."""
    data = np.frombuffer(open(path, "rb").read(), dtype=np.uint8)
    n_held = int(len(data) * (1 - heldout_fraction))
    n_train = int(len(data) * (1 - heldout_fraction - val_fraction))
    return data[:n_train], data[n_train:n_held], data[n_held:]


def batches(data, batch, seq, gen, device):
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    xy = torch.from_numpy(data.astype(np.int64))[idx]
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


def heldout_windows(data, seq, n, device):
    """n fixed, evenly spaced windows of the held-out text (same every evaluation)."""
    starts = np.linspace(0, len(data) - seq - 1, n).astype(np.int64)
    idx = starts[:, None] + np.arange(seq + 1)[None, :]
    xy = torch.from_numpy(data.astype(np.int64)[idx])
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


@torch.no_grad()
def evaluate(model, x, y, routing):
    """Mean held-out loss (nats/byte) and per-layer expert counts under one routing rule."""
    model.eval()
    model.set_routing(routing)
    losses, counts, iters, agree = [], {}, {}, {}
    for i in range(0, x.shape[0], 16):
        logits = model(x[i:i + 16])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      y[i:i + 16].reshape(-1), reduction="sum").item())
        for l, m in model.moe_layers():
            ids, it, top = m.last
            c = torch.bincount(ids, minlength=m.X).cpu().numpy()
            counts[l] = counts.get(l, 0) + c
            iters.setdefault(l, []).append(it)
            agree.setdefault(l, []).append((ids == top).float().mean().item())
    model.train()
    return (sum(losses) / y.numel(),
            {str(l): c.tolist() for l, c in counts.items()},
            {str(l): float(np.mean(v)) for l, v in iters.items()},
            {str(l): float(np.mean(v)) for l, v in agree.items()})


# ---- export -----------------------------------------------------------------------------------

def export(model, cfg, out_dir, note):
    os.makedirs(out_dir, exist_ok=True)
    sd = collections.OrderedDict(
        (k, v.detach().to("cpu", torch.bfloat16).contiguous().clone())
        for k, v in model.released_state_dict().items())
    torch.save({"model": sd}, os.path.join(out_dir, "pytorch_model.bin"))
    conf = dict(cfg)
    conf["routing"] = note
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    return os.path.getsize(os.path.join(out_dir, "pytorch_model.bin"))


# ---- main -------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(HERE), "..", "shared", "data",
                                                   "tinyshakespeare.txt"))
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--log", required=True, help="folder for train_log.json, reference_logits.npz")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--pairs", type=int, default=4, help="(Mamba, MoE) layer pairs")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=192)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (0: from the budget)")
    ap.add_argument("--time-budget", type=float, default=360.0, help="seconds of training")
    ap.add_argument("--eval-every", type=int, default=0, help="0: about 12 points over the run")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True      # training only; the dump below is fp32
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device(args.device)
    d = args.hidden
    cfg = {"num_layers": 2 * args.pairs, "hidden_size": d, "state_size": args.state,
           "conv_dimension": 4, "expansion_factor": 2, "vocab_size": 256,
           "mamba_moe_layers": ["r", str(args.experts)] * args.pairs,
           "ffn_hidden_size": args.ffn, "dt_rank": math.ceil(d / 16), "bias": False,
           "add_bias_linear": False, "conv_bias": True, "swiglu": True, "activation": "gelu",
           "max_sequence_length": args.seq, "tokenizer": "byte"}
    train, val, held = load_split(args.data, args.heldout_fraction, args.val_fraction)
    model = BlackMamba(dict(cfg, _dropout=args.dropout)).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({2 * n_params / 1e6:.2f} MB in bf16); "
          f"train {len(train):,} bytes, validation {len(val):,}, held-out {len(held):,}; "
          f"device {dev}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    hx, hy = heldout_windows(held, args.seq, args.eval_windows, dev)
    vx, vy = heldout_windows(val, args.seq, args.eval_windows, dev)
    log = {"config": cfg, "args": vars(args), "parameters": n_params,
           "train_bytes": int(len(train)), "validation_bytes": int(len(val)),
           "heldout_bytes": int(len(held)), "train": [], "eval": []}
    best = {"val_loss": float("inf"), "step": -1, "state": None}

    total = args.steps or None
    eval_every = args.eval_every
    step, t_start, t_timed = 0, time.perf_counter(), None

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        T = total or 10 ** 9
        p = min(1.0, (s - args.warmup) / max(1, T - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def do_eval():
        ent = {"step": step, "time_s": round(time.perf_counter() - t_start, 2)}
        vloss = evaluate(model, vx, vy, "argmax")[0]
        ent["validation"] = {"loss": vloss, "bits_per_byte": vloss / math.log(2)}
        if vloss < best["val_loss"]:
            best.update(val_loss=vloss, step=step,
                        state={k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()})
        for routing in ("argmax", "sinkhorn"):
            loss, counts, iters, agree = evaluate(model, hx, hy, routing)
            ent[routing] = {"loss": loss, "bits_per_byte": loss / math.log(2),
                            "expert_counts": counts}
            if routing == "sinkhorn":
                ent[routing]["sinkhorn_iterations"] = iters
                ent[routing]["agreement_with_argmax"] = agree
        log["eval"].append(ent)
        print(f"step {step:5d}  bits/byte: validation {vloss / math.log(2):.4f}  held-out: "
              f"argmax {ent['argmax']['bits_per_byte']:.4f}  "
              f"sinkhorn {ent['sinkhorn']['bits_per_byte']:.4f}", flush=True)

    model.train()
    model.set_routing("sinkhorn")
    do_eval()
    model.set_routing("sinkhorn")
    while total is None or step < total:
        if total is None and step == 30:                    # steps 10..30 timed: fix the length
            per = (time.perf_counter() - t_timed) / 20
            total = max(step + 1, int(args.time_budget / per))
            log["seconds_per_step"] = per
            print(f"{per * 1e3:.1f} ms/step -> {total} steps", flush=True)
        if step == 10:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_timed = time.perf_counter()
        if not eval_every and total is not None:
            eval_every = max(1, total // 20)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batches(train, args.batch, args.seq, gen, dev)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == 1:
            iters = {str(l): m.last[1] for l, m in model.moe_layers()}
            agree = {str(l): (m.last[0] == m.last[2]).float().mean().item()
                     for l, m in model.moe_layers()}
            log["train"].append({"step": step, "loss": loss.item(), "lr": lr_at(step - 1),
                                 "grad_norm": float(gnorm), "sinkhorn_iterations": iters,
                                 "agreement_with_argmax": agree,
                                 "time_s": round(time.perf_counter() - t_start, 2)})
        if step % 100 == 0:
            print(f"step {step:5d}  train loss {loss.item():.4f}  "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        if eval_every and (step % eval_every == 0) and (total is None or step < total):
            do_eval()
            model.set_routing("sinkhorn")
    log["train_seconds"] = time.perf_counter() - t_start
    log["steps"] = step
    do_eval()

    # ship the checkpoint with the best validation loss (early stopping; the held-out split
    # played no part), rounded to bf16: evaluate and dump on exactly those weights
    model.load_state_dict(best["state"])
    log["chosen_step"] = best["step"]
    round_to_bf16_(model)
    step = best["step"]
    do_eval()
    log["shipped_eval"] = log["eval"].pop()
    size = export(model, cfg, args.out,
                  "trained with Sinkhorn top-1 (blackmamba init, tol 1e-4); argmax top-1 at "
                  "inference")
    log["file_bytes"] = size

    # reference forward of this framework on the shipped weights: float32 on the CPU, no TF32
    cpu = model.to("cpu").eval()
    cpu.set_routing("argmax")
    rx = torch.from_numpy(held[:2 * 128].astype(np.int64).reshape(2, 128))
    with torch.no_grad():
        ref_logits = cpu(rx).numpy().astype(np.float32)
    os.makedirs(args.log, exist_ok=True)
    np.savez_compressed(os.path.join(args.log, "reference_logits.npz"),
                        input_ids=rx.numpy().astype(np.int32), logits=ref_logits)
    with open(os.path.join(args.log, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    print(f"done: {log['steps']} steps in {log['train_seconds']:.0f} s; shipped step "
          f"{best['step']}: {args.out}/pytorch_model.bin {size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
