#!/usr/bin/env bash
# llm-compressor GPTQ W4A16 on the demo model with our calibration and evaluation tokens, in its own virtualenv
# (it pins other versions than ours). Our side of the comparison: python benchmarks/quant.py --settings w4g128
# --methods gptq (group 128 falls back to 64 on the 576-wide modules; llm-compressor refuses 128 there, so it
# runs group 64 everywhere, including the 1536-wide down_proj where ours keeps 128).
#   SAMPLES=128 SEQ_LEN=512 EVAL_TOKENS=16384 GROUP=64 ACT_ORDER=1 THREADS=2 LLMC_VENV=/tmp/venv-llmc \
#     bash benchmarks/llmcompressor_gptq.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMC_VENV:-/tmp/venv-llmc}
DATA=${LLMC_DATA:-/tmp/llmc-bench}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0   # the CPU build first; a bare torch requirement pulls CUDA
  "$VENV/bin/pip" install -q llmcompressor
fi
python benchmarks/llmcompressor_data.py --out "$DATA" --samples "${SAMPLES:-128}" --seq-len "${SEQ_LEN:-512}" \
  --eval-tokens "${EVAL_TOKENS:-16384}"
"$VENV/bin/python" benchmarks/llmcompressor_run.py --data "$DATA" --group "${GROUP:-64}" \
  ${ACT_ORDER:+--act-order} ${THREADS:+--threads "$THREADS"}
