"""Quality evaluation of MeTTA (`metta eval`): per-view embeddings once, every figure derived from them.

Stages, one module each: `data` (labelled photos and edited retrieval queries) → `views` (per-view
embeddings of a policy's plan, cached) → `metrics` (accuracy, NLL, paired tests, AUROC, retrieval)
→ `studies` (the four studies of the quality issue) → `report` (JSON, markdown tables, PNG plots).
"""
