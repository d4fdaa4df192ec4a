"""The `blackmamba` command: generate, info, convert (routing, eval, perplexity: see --help)."""
import argparse
import json
import os
import sys
import time


def _add_model(p, required=True):
    p.add_argument("--model", "-m", required=required, default=None,
                   help="checkpoint folder, weights file, or hub id (Zyphra/BlackMamba-2.8B)"
                   + ("" if required else "; default: the small Shakespeare model shipped "
                      "with the package"))
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights in memory (default float32 on the CPU, bfloat16 on the GPU; "
                   "float16: --device cuda only)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json path")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def _load(args):
    import blackmamba as bm
    if args.threads:
        bm.ops.set_num_threads(args.threads)
    return bm.load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)


def cmd_generate(args):
    model = _load(args)
    if model.tokenizer is None:
        raise SystemExit(f"error: no tokenizer for this model: {model.tokenizer_error}")
    t0, n = time.perf_counter(), 0
    pieces = model.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, stop=args.stop or None, stream=True)
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    if args.verbose:
        dt = time.perf_counter() - t0
        print(f"[{n} pieces in {dt:.2f} s]", file=sys.stderr)
    return 0


def cmd_info(args):
    import blackmamba as bm
    from .hub import resolve_model_dir
    from .model import count_parameters
    d = resolve_model_dir(args.model)
    cfg = bm.load_config(d if os.path.isdir(d) else os.path.dirname(d))
    total, active = count_parameters(cfg)
    info = {"config": cfg.to_dict(), "parameters_total": total, "parameters_active": active,
            # float16: GPU only (--device cuda); 2 bytes a weight like bfloat16
            "memory_bytes": {"float32": 4 * total, "bfloat16": 2 * total, "float16": 2 * total},
            "active_bytes_per_token": {"float32": 4 * active, "bfloat16": 2 * active,
                                       "float16": 2 * active},
            "cpu": bm.ops.cpu_info()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model         {args.model or d}")
    print(f"layers        {cfg.num_layers}: {''.join(k if len(k) == 1 else '(' + k + ')' for k in cfg.layer_kinds)}")
    print(f"hidden        d={cfg.hidden_size}  d_inner={cfg.d_inner}  state N={cfg.state_size}  "
          f"conv K={cfg.conv_dimension}  dt_rank={cfg.dt_rank}  ffn F={cfg.ffn_hidden_size}")
    print(f"vocab         {cfg.vocab_size}")
    print(f"parameters    total {total:,}   active per token {active:,}")
    for dt, b in info["memory_bytes"].items():
        print(f"memory {dt:9s} {b / 1e9:.2f} GB  (read per decoded token: "
              f"{info['active_bytes_per_token'][dt] / 1e9:.2f} GB)")
    return 0


def cmd_convert(args):
    from .checkpoint import load_tensors, save_safetensors
    from .hub import resolve_model_dir
    src = resolve_model_dir(args.model)
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    weights = os.path.join(src_dir, "pytorch_model.bin") if os.path.isdir(src) else str(src)
    out = args.out
    os.makedirs(out, exist_ok=True)
    tensors = load_tensors(weights, progress=True)
    save_safetensors(os.path.join(out, "model.safetensors"), tensors,
                     metadata={"format": "pt", "source": os.path.basename(weights)})
    for extra in ("config.json", "tokenizer.json"):
        p = os.path.join(src_dir, extra)
        if os.path.exists(p) and os.path.abspath(os.path.dirname(p)) != os.path.abspath(out):
            with open(p, "rb") as f, open(os.path.join(out, extra), "wb") as g:
                g.write(f.read())
    print(f"wrote {os.path.join(out, 'model.safetensors')} ({len(tensors)} tensors)")
    return 0


def build_parser():
    ap = argparse.ArgumentParser(prog="blackmamba", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to the terminal")
    _add_model(g, required=False)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", "-n", type=int, default=100)
    g.add_argument("--temperature", "-t", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--verbose", "-v", action="store_true")
    g.set_defaults(fn=cmd_generate)
    i = sub.add_parser("info", help="config, parameter counts, memory at each dtype")
    i.add_argument("--model", "-m", default=None,
                   help="default: the Shakespeare model shipped with the package")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    c = sub.add_parser("convert", help="write a safetensors copy that loads faster")
    c.add_argument("--model", "-m", required=True)
    c.add_argument("--out", "-o", required=True, help="output folder")
    c.set_defaults(fn=cmd_convert)
    from .routing import add_cli as add_routing
    add_routing(sub)
    from .eval_cli import add_cli as add_eval_cli
    add_eval_cli(sub)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as exc:   # RuntimeError: no GPU
        print(f"error: {exc}", file=sys.stderr)
        return 2
