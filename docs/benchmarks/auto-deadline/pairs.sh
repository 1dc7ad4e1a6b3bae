#!/bin/bash
# Kept as run (paths as on that day): the code under test in /work/lead, 02c7108 in /tmp/base-photos.
# Interleaved deadline benchmark: 02c7108 vs this code, 3 pairs, alternating which goes first.
out=/tmp/lead-dl; mkdir -p $out
for i in 1 2 3; do
  if [ $((i % 2)) = 1 ]; then order="base mine"; else order="mine base"; fi
  for who in $order; do
    if [ $who = base ]; then tree=/tmp/base-photos; else tree=/work/lead; fi
    (cd $tree && PYTHONPATH=$tree timeout 300 /work/main/.venv/bin/python /work/lead/docs/benchmarks/auto-deadline/one_run.py $out/dl-$who-$i.json) 2>&1 | tail -1
  done
done
