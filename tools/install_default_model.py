"""Install a training run's output as the shipped default model, keeping every copy in step.

    python3 tools/install_default_model.py RUN_DIR [--compare docs/default_model/run1-no-dropout/train_log.json]

RUN_DIR is what tools/train_on_device.sh wrote ($OUT of the device call): model/config.json,
model/pytorch_model.bin, log/train_log.json, log/reference_logits.npz, train.out, gpu.txt.
This copies the model into blackmamba/models/shakespeare, the reference logits into
tests/data, the log into docs/default_model, redraws docs/default_model_training.png, computes
the held-out bits per byte with the package's CPU path and writes that number into
tests/test_default_model.py, README.md and the model card (the test checks they agree).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _sub_once(path, pattern, repl):
    with open(path) as f:
        text = f.read()
    new, n = re.subn(pattern, repl, text)
    if n != 1:
        raise SystemExit(f"{path}: expected one match of {pattern!r}, found {n}")
    with open(path, "w") as f:
        f.write(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--compare", default=None, help="another run's train_log.json for the figure")
    args = ap.parse_args(argv)
    run = args.run_dir
    dst = os.path.join(ROOT, "blackmamba", "models", "shakespeare")
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copyfile(os.path.join(run, "model", name), os.path.join(dst, name))
    shutil.copyfile(os.path.join(run, "log", "reference_logits.npz"),
                    os.path.join(ROOT, "tests", "data", "default_model_reference.npz"))
    docs = os.path.join(ROOT, "docs", "default_model")
    os.makedirs(docs, exist_ok=True)
    shutil.copyfile(os.path.join(run, "log", "train_log.json"), os.path.join(docs, "train_log.json"))
    for name in ("train.out", "gpu.txt"):
        if os.path.exists(os.path.join(run, name)):
            shutil.copyfile(os.path.join(run, name), os.path.join(docs, name))
    plot = [sys.executable, os.path.join(ROOT, "tools", "plot_training.py"),
            os.path.join(docs, "train_log.json"),
            os.path.join(ROOT, "docs", "default_model_training.png")]
    if args.compare:
        plot += ["--compare", args.compare]
    subprocess.run(plot, check=True)

    import blackmamba as bm
    from blackmamba.scoring import perplexity
    with open(os.path.join(dst, "heldout.txt"), "rb") as f:
        held = f.read()
    model = bm.load(dst)
    bpb = perplexity(model, list(held), num_bytes=len(held))["bits_per_byte"]
    _sub_once(os.path.join(ROOT, "tests", "test_default_model.py"),
              r"HELDOUT_BITS_PER_BYTE = [0-9.]+", f"HELDOUT_BITS_PER_BYTE = {bpb:.4f}")
    _sub_once(os.path.join(ROOT, "README.md"),
              r"\*\*Held-out: [0-9.]+ bits per byte\*\*", f"**Held-out: {bpb:.3f} bits per byte**")
    _sub_once(os.path.join(dst, "README.md"),
              r"Held-out: [0-9.]+ bits per byte", f"Held-out: {bpb:.3f} bits per byte")
    size = os.path.getsize(os.path.join(dst, "pytorch_model.bin"))
    print(f"installed {run}: held-out {bpb:.4f} bits/byte, {size / 1e6:.2f} MB; check the "
          f"README's training paragraph (steps, seconds, dropout, findings) by hand")


if __name__ == "__main__":
    main()
