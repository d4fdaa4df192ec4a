# Sourced (from the repository root) by the tools/*.sh scripts that run on the GPU machine:
# installs the carried wheels (.whl: PyPI packages the machine lacks) into /tmp/site, puts the
# repository first on PYTHONPATH, and points the tests at the carried golden files (.shared).
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .shared ]; then
    export BLACKMAMBA_SHARED="$PWD/.shared"
fi
# nvcc objects built beforehand on another machine with the same nvcc (tools/prebuild_cuda.sh,
# carried as .cuobj): setup.py reuses each one whose key matches and compiles the rest.
if [ -d .cuobj ]; then
    export BLACKMAMBA_CUDA_OBJ_CACHE="$PWD/.cuobj"
fi
