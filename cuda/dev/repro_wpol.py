import os, sys, subprocess
code = r'''
import os, sys, numpy as np
sys.path.insert(0, "benchmarks")
from bench_gpu import SHAPE_2_8B, random_bf16_tensors
from blackmamba import model_cuda
from blackmamba.config import Config
cfg = Config.from_dict(dict(SHAPE_2_8B))
model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
B = int(os.environ["RB"])
st = model.new_state(B)
rng = np.random.default_rng(0)
model.prefill(rng.integers(0, 50000, (B, 8)), st, logits=None)
for i in range(3): model.step(rng.integers(0, 50000, B), st)
print("ok")
'''
for env in ["BLACKMAMBA_MOE_WPOL=1,1", "BLACKMAMBA_MOE_WPOL=1,0", "BLACKMAMBA_MOE_WPOL=0,1", "BLACKMAMBA_L2SIDE=32", "BLACKMAMBA_MOE_WPOL=1,1 BLACKMAMBA_CUDA_PDL=0"]:
    for B in (8, 4, 2):
        e = dict(os.environ, RB=str(B))
        for kv in env.split(): k, v = kv.split("="); e[k] = v
        r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True)
        print(env, B, r.stdout.strip()[-20:], r.stderr.strip()[-200:].replace("\n", " | "), flush=True)
