import base64, json, sys, tempfile
from pathlib import Path
from service.testing import photos
images = [base64.b64encode(p).decode() for p in photos(limit=100).images[:40]]
if Path("bench/auto_s.py").exists():
    from bench import auto_s
    r = auto_s.with_deadlines(images, 2, 20.0, Path(tempfile.mkdtemp()))
else:
    import argparse
    from bench import goals
    from bench.loadgen import json_bodies
    pics = photos(limit=100)
    r = goals.part_auto(argparse.Namespace(threads=2, seconds=20.0), {1: json_bodies(pics.images, 1)}, Path(tempfile.mkdtemp()))
Path(sys.argv[1]).write_text(json.dumps(r))
print(sys.argv[1], r["images_per_s_ratio"], r["fixed_s32"]["images_per_s"], r["auto_4_32"]["images_per_s"], r["auto_4_32"]["codes"])
