"""`metta embed PATH... --out OUT.parquet`: folders of images into a resumable Parquet dataset.

files.py lists and reads the inputs (canonical identity, regular files only, bounded reads), dataset.py owns
the dataset directory (parts, resume, stale rows, the error log), lock.py keeps one run per output,
local.py computes with the library core in this process, remote.py asks a running metta-serve,
command.py ties them together (progress, summary line, exit codes).
"""
