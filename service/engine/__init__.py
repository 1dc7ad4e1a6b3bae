"""Serving: the scheduler (admission, round-robin batches, deadlines; no threads) and the worker
that runs its batches through render → forward → reduce, stages overlapped."""
