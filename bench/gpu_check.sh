#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and this project's code (e.g. the device tool),
# run the benchmark suite at a size that finishes in about 8 minutes and print the figures.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# The project is not installed there: the code runs from the checkout (PYTHONPATH). torch,
# transformers, tokenizers, numpy, scipy, pillow and safetensors are expected on the machine.
# faiss, SQLAlchemy and alembic usually are not: carry them as wheels in .whl/ (git-ignored),
# prepared on a machine with pip access for the device's Python (3.12 on the H200 image):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl faiss-cpu==1.15.1 sqlalchemy alembic mako greenlet ir-measures
#
# (faiss-cpu keeps the wheels small enough to carry; with it the FAISS part runs on the CPU
# and says so. Carry faiss-gpu instead where the transfer limit allows.) Parts whose packages
# are missing are skipped with a line that says so.
# VTF_QUICK=1 shrinks every size (a smoke run of the script itself on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${VTF_QUICK:-0}" = 1 ]; then Q=1; N_RET=100000; N_ING=300; BATCH=64; else Q=0; N_RET=1000000; N_ING=4000; BATCH=512; fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vtf-site .whl/*.whl \
        && export PYTHONPATH="/tmp/vtf-site:${PYTHONPATH:-}" || echo "wheel install failed; parts that need them are skipped"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
have() { $PY -c "import $1" >/dev/null 2>&1; }
section() { echo; echo "==== $* ===="; }

section device
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

section "model forward vs bf16 ceiling (torch only)"
timeout 120 $PY bench/forward.py --batch $BATCH --steps 30 || echo "forward bench failed"
timeout 180 $PY bench/forward.py --batch $BATCH --steps 30 --compile || echo "compiled forward bench failed"

if have faiss; then
    section "retrieval: auto index vs exact (faiss $($PY -c 'import faiss; print(faiss.__version__, "GPUs", faiss.get_num_gpus())'))"
    timeout 240 $PY bench/retrieval.py --sizes $N_RET --nq 2000 || echo "retrieval bench failed"
else
    echo "SKIP retrieval: faiss is not installed (carry it in .whl/, see the top of this script)"
fi

if have faiss && have sqlalchemy && have alembic; then
    section "ingest: end-to-end vs forward-only"
    timeout 180 $PY bench/ingest.py --n $N_ING --batch-size 256 || echo "ingest bench failed"
    section "rerank: token cache vs re-encoding"
    timeout 120 $PY bench/rerank.py --n 400 --queries 10 || echo "rerank bench failed"
    section "filtered retrieval"
    timeout 120 $PY bench/filtered.py --n $((N_RET / 10)) --nq 200 || echo "filtered bench failed"
    section "end-to-end query latency"
    timeout 150 $PY bench/e2e.py --n $((N_RET / 10)) --queries 100 || echo "e2e bench failed"
else
    echo "SKIP ingest / rerank / e2e: faiss, sqlalchemy and alembic are needed (carry them in .whl/)"
fi
