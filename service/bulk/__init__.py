"""`metta embed PATH... --out OUT.parquet`: folders of images into a resumable Parquet dataset.

files.py lists the inputs, dataset.py owns the dataset directory (parts, resume, the error log),
local.py computes with the library core in this process, remote.py asks a running metta-serve,
command.py ties them together (progress, summary line, exit codes).
"""
