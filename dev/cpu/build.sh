#!/bin/sh
# build the dev harness against the worktree's csrc -> /tmp/bench_gemm
OB=$(python3 -c "import scipy_openblas32 as ob, os; print(os.path.dirname(ob.get_lib_dir()))")
cd "$(dirname "$0")" && gcc -O3 -fopenmp -std=gnu11 -Wall -I../../csrc -I$OB/include bench_gemm.c ../../csrc/cpu.c \
  -L$OB/lib -lscipy_openblas -Wl,-rpath,$OB/lib -lm -o /tmp/bench_gemm "$@"
