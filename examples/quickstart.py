"""NFM from Python, end to end, in the style of a notebook (the test suite runs it on the tiny preset).

    python examples/quickstart.py [WORKDIR] [PRESET]     # default: ./quickstart-run, tiny (seconds)

Every cell prints what it made; PRESET=digits gives the real demo (about 10 minutes on 2 CPU cores).
"""

import sys
from pathlib import Path

import torch

import nfm

work = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart-run")
preset = sys.argv[2] if len(sys.argv) > 2 else "tiny"

# 1. The whole pipeline: teacher -> pair cache -> students -> FID -> report (finished stages are reused)
report = nfm.run(preset, run_dir=work / "run", cache_dir=work / "cache", couplings="nfm,independent")
print("students:", ", ".join(report["students"]), "| NFM FID at one Euler step:",
      round(report["students"]["nfm"]["rows"][0]["fid"], 2))  # fmt: skip

# 2. A trained student: its own prior, classes and path; samples as PIL images
student_dir = next((work / "run" / "students").glob("nfm-*"))
student = nfm.Student.from_pretrained(student_dir, device="cpu")
images = student.sample(10, steps=2, seed=0, output="pil")
images[0].save(work / "nfm-sample-0.png")
print(f"student: {len(images)} PIL images of {images[0].size}, classes {student.num_classes}")

# 3. save_pretrained / from_pretrained round trip: the same samples from the same seed
student.save_pretrained(work / "my-student")
again = nfm.Student.from_pretrained(work / "my-student", device="cpu")
assert (again.sample(4, steps=2, seed=1) == student.sample(4, steps=2, seed=1)).all()
print("student saved to", work / "my-student")

# 4. The teacher: sample it, or encode images into its noise (the NFM coupling)
teacher = nfm.Teacher.from_pretrained(next((work / "run").glob("teacher-*")), device="cpu")
x = teacher.sample(4, labels=[0, 1, 2, 3], seed=0)
z = teacher.encode(x, torch.tensor([0, 1, 2, 3]))
print("teacher samples:", tuple(x.shape), "| their noise std:", round(z.std().item(), 3))

# 5. The pair cache as a datasets.Dataset (the shards memory-mapped, no copy) and as a torch Dataset
pairs = nfm.PairCache.open(report["pair_cache"]["path"])  # or its key under the cache root
ds = pairs.to_dataset()  # columns noise, data (stored grey levels), label, index
print(f"pair cache {pairs.key}: {len(ds)} rows, columns {ds.column_names}, noise {tuple(ds[0]['noise'].shape)}")
noise, image, label = pairs.torch_dataset()[0]
assert (noise == ds[0]["noise"]).all() and (image == pairs.to_float(ds[0]["data"])).all() and label == ds[0]["label"]
