#!/usr/bin/env bash
# llama.cpp itself reading the GGUF files we write: builds llama-cpp-python from the package registry in its own
# virtualenv (10-20 minutes on 2 cores; never part of the test suite), writes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 files
# of the demo model (RTN, GPTQ groups of 32 and 128, a ShortGPT-pruned Q8_0), and compares llama.cpp's logits and
# perplexity on our evaluation windows with the in-memory model's.
#   THREADS=2 EVAL_TOKENS=4096 LLAMACPP_VENV=/tmp/venv-llamacpp bash benchmarks/llamacpp.sh
# Run with the project venv active (the reference step imports compressor). SETTINGS picks rows (default: all,
# see benchmarks/llamacpp_ref.py); LLAMACPP_VERSION pins llama-cpp-python (default 0.3.36, the version measured).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLAMACPP_VENV:-/tmp/venv-llamacpp}
DATA=${LLAMACPP_DATA:-/tmp/llamacpp-bench}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # no downloads: the local demo model and text
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy
  # Built from source for this CPU; tests, examples and the server are not needed.
  CMAKE_BUILD_PARALLEL_LEVEL=${THREADS:-2} \
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
    "$VENV/bin/pip" install -q "llama-cpp-python==${LLAMACPP_VERSION:-0.3.36}"
fi
OMP_NUM_THREADS=${THREADS:-2} python benchmarks/llamacpp_ref.py --out "$DATA" --eval-tokens "${EVAL_TOKENS:-4096}" \
  ${SETTINGS:+--settings "$SETTINGS"} ${THREADS:+--threads "$THREADS"}
"$VENV/bin/python" benchmarks/llamacpp_run.py --data "$DATA" --threads "${THREADS:-2}"
