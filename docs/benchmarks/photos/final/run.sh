#!/bin/bash
# The real-photos speed goals on the final code, in one go on a machine with nothing else running:
# the thumbnails' S=32 x 4 and S=1 x 16 against R, then 12 MP photos through /v1/embeddings and `metta embed`
# side by side with main 02c7108 (a worktree at /tmp/base-photos: git worktree add /tmp/base-photos 02c7108).
# /tmp/photos-set: python -m bench.photo_set --out /tmp/photos-set --count 10
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../../.."
stamp() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
stamp
METTA_SAMPLES_DIR=${METTA_SAMPLES_DIR:-/work/shared/data/imagenet-sample} \
  .venv/bin/python -m bench.goals --parts default --repeats 3 --seconds 10 --out /tmp/final-goals
stamp
.venv/bin/python -m bench.photos --files /tmp/photos-set --baseline /tmp/base-photos --seconds 10 --repeats 3 \
  --embed-files 0 --out /tmp/final-photos.json
stamp
.venv/bin/python -m bench.photos --files /tmp/photos-set --baseline /tmp/base-photos --no-service --repeats 1 \
  --embed-files 1000 --out /tmp/final-embed.json
stamp
