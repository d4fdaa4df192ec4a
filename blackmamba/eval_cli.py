"""`blackmamba eval`, `blackmamba lm-eval`, `blackmamba perplexity` (registered by add_cli).

eval and lm-eval need the optional lm-eval package (`pip install "blackmamba[eval]"`),
imported only when they run; perplexity needs nothing beyond blackmamba.
"""
import argparse
import json
import os
import sys

from .cli import _add_model, _load

EVAL_EXTRA = "pip install 'blackmamba[eval]'   (lm-eval >= 0.4.10: no torch needed)"


def _need_lm_eval(what):
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"error: `blackmamba {what}` needs lm-eval ({exc}): {EVAL_EXTRA}")


def cmd_eval(args):
    """lm_eval.simple_evaluate on our model: results table on stdout, JSON with --output."""
    _need_lm_eval("eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval import BlackMambaLM
    model = _load(args)
    lm = BlackMambaLM(model=model, pretrained=args.model, batch_size=args.batch_size,
                      seed=args.seed, max_tokens=args.max_tokens)
    tasks = [t for t in args.tasks.split(",") if t]
    tm = _task_manager(TaskManager, args.include_path, tasks)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot,
                                  limit=args.limit, task_manager=tm,
                                  log_samples=args.log_samples,
                                  bootstrap_iters=args.bootstrap_iters,
                                  random_seed=args.seed, numpy_random_seed=args.seed)
    if out is None:
        return 1
    out["config"]["model"] = f"blackmamba ({args.model}, dtype={model.dtype})"
    print(_table(out))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, default=str, ensure_ascii=False)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _task_manager(TaskManager, include_path, tasks):
    """Indexing lm-eval's thousands of built-in task files takes ~10 s: skip it when every
    requested task is in --include-path."""
    if include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    return TaskManager(include_path=include_path)


def _table(out):
    try:
        from lm_eval.utils import make_table
        text = make_table(out)
        if out.get("groups"):
            text += "\n" + make_table(out, "groups")
        return text
    except ImportError:                   # pytablewriter missing: plain lines
        lines = []
        for task, res in out["results"].items():
            for k, v in res.items():
                if "," in k and "stderr" not in k:
                    lines.append(f"{task:24s} {k:28s} {v}")
        return "\n".join(lines)


def cmd_lm_eval(args):
    """lm-eval's own command line, with "blackmamba" registered as a model."""
    _need_lm_eval("lm-eval")
    from lm_eval.__main__ import cli_evaluate

    import blackmamba.lm_eval  # noqa: F401  (registers the model)
    old = sys.argv
    sys.argv = ["lm-eval"] + list(args.lm_eval_args)
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0


def cmd_perplexity(args):
    """Perplexity and bits per byte of a text file, one recurrent pass with a progress bar."""
    from .scoring import perplexity
    if args.text is None:
        from .hub import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_heldout_text
        if args.model is not None and args.model not in EMBEDDED_MODELS:
            raise ValueError("--text is required with --model (the default text is the "
                             "shipped model's held-out split)")
        args.text = str(embedded_heldout_text(args.model or DEFAULT_MODEL))
    model = _load(args)
    if model.tokenizer is None:
        raise SystemExit(f"error: no tokenizer for this model: {model.tokenizer_error}")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = list(model.tokenizer.encode(text))
    if args.max_tokens is not None and len(ids) > args.max_tokens:
        ids = ids[:args.max_tokens]
        text = model.tokenizer.decode(ids)           # bytes actually scored
    num_bytes = len(text.encode("utf-8"))
    res = perplexity(model, ids, max_tokens=args.tokens_per_call, progress=not args.quiet,
                     num_bytes=num_bytes)
    res.update(model=args.model or "shakespeare", text=args.text, dtype=model.dtype)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.text}: {res['tokens']:,} tokens, {num_bytes:,} bytes")
        print(f"perplexity      {res['ppl']:.4f}   (token level, after an EOS prefix)")
        print(f"bits per byte   {res['bits_per_byte']:.4f}")
        print(f"nll             {res['nll'] / res['tokens']:.4f} nats/token   "
              f"next-token accuracy {res['accuracy']:.4f}")
        print(f"speed           {res['tokens_per_s']:.1f} tokens/s "
              f"({res['seconds']:.1f} s, {model.dtype}, "
              f"{model.device}, threads={_threads()})")
    return 0


def _threads():
    from . import ops
    return ops.get_num_threads()


def add_cli(sub):
    """Add the eval, lm-eval and perplexity subcommands to blackmamba's subparsers."""
    e = sub.add_parser("eval", help="zero/few-shot benchmarks through lm-eval (needs [eval])",
                       description="Run lm-eval tasks on a BlackMamba model. Example: "
                       "blackmamba eval -m Zyphra/BlackMamba-2.8B --tasks hellaswag,piqa")
    _add_model(e)
    e.add_argument("--tasks", "-t", required=True, help="comma-separated lm-eval task names")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", "-b", type=int, default=16,
                   help="contexts / continuation rows per model call (default 16)")
    e.add_argument("--max-tokens", type=int, default=2048,
                   help="tokens per model call: bounds the logits in memory (default 2048)")
    e.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if < 1): for quick checks only")
    e.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    e.add_argument("--output", "-o", default=None, help="write all results as JSON here")
    e.add_argument("--log-samples", action="store_true", help="per-sample outputs in --output")
    e.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for standard errors (0: none)")
    e.add_argument("--seed", type=int, default=1234)
    e.set_defaults(fn=cmd_eval)

    le = sub.add_parser("lm-eval", add_help=False, prefix_chars="+",
                        help="lm-eval's own command line with --model blackmamba available",
                        description="Every argument goes to lm-eval unchanged, e.g. "
                        "blackmamba lm-eval --model blackmamba --model_args "
                        "pretrained=Zyphra/BlackMamba-2.8B,dtype=bfloat16 --tasks piqa")
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    le.set_defaults(fn=cmd_lm_eval)

    p = sub.add_parser("perplexity", help="perplexity and bits per byte of a text file",
                       description="Token-level perplexity and bits per byte of a UTF-8 text "
                       "file in one recurrent pass (no context window). With neither --model "
                       "nor --text: the shipped Shakespeare model on its held-out split.")
    _add_model(p, required=False)
    p.add_argument("--text", default=None,
                   help="UTF-8 text file (default, without --model: the shipped model's "
                        "held-out Tiny Shakespeare text)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--tokens-per-call", type=int, default=2048,
                   help="tokens per model call (memory: this x vocab x 4 bytes of logits)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_perplexity)
