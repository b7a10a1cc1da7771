#!/usr/bin/env bash
# Intel auto-round on the demo model with our calibration and evaluation tokens, in its own virtualenv (it pins
# other versions than ours; the project never imports it). ITERS=0 is its "optimized RTN", ITERS=50 SignRound
# "light", ITERS=200 its default SignRound. Our side: python benchmarks/quant.py (same SAMPLES/SEQ_LEN/EVAL_TOKENS).
#   SAMPLES=64 SEQ_LEN=512 EVAL_TOKENS=16384 BITS=4 GROUP=64 ITERS=0 THREADS=2 AR_VENV=/tmp/venv-autoround \
#     bash benchmarks/autoround.sh
# Run with the project venv active (the data step imports compressor). AR_VERSION pins auto-round (default
# 0.16.1, the version issue 15 measured); COMPILE=0 turns off the torch.compile it enables for ITERS >= 10.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AR_VENV:-/tmp/venv-autoround}
DATA=${AR_DATA:-/tmp/autoround-bench}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # no downloads: our tokens and the local demo model directory
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import auto_round" 2>/dev/null; then
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0   # the CPU build first; a bare torch requirement pulls CUDA
  "$VENV/bin/pip" install -q "auto-round==${AR_VERSION:-0.16.1}"
fi
python benchmarks/llmcompressor_data.py --out "$DATA" --samples "${SAMPLES:-64}" --seq-len "${SEQ_LEN:-512}" \
  --eval-tokens "${EVAL_TOKENS:-16384}"
NO_COMPILE=""
if [ "${COMPILE:-1}" = "0" ]; then NO_COMPILE=1; fi
"$VENV/bin/python" benchmarks/autoround_run.py --data "$DATA" --bits "${BITS:-4}" --group "${GROUP:-64}" \
  --iters "${ITERS:-0}" ${THREADS:+--threads "$THREADS"} ${NO_COMPILE:+--no-compile}
