import os

# Tests never touch the network: the hub is off, so an unknown dataset name fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers share the cores, one thread each (and their
    os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses); two threads per worker on two cores slow both many times

import contextlib  # noqa: E402
import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig  # noqa: E402


def run_nfm(*args, cwd=None, env=None, nproc=1, check=True, timeout=1800, background=False, capture=False):
    """The real `nfm` command (`python -m nfm ARGS`) in a subprocess, offline. nproc > 1: under torchrun
    (gloo on the CPU). check=True: fail the test with the command's output unless it exits 0.
    background=True: return the running Popen (output discarded; capture=True: piped as text). The timeout
    is a hang guard with a wide margin, not a performance bound: tests size their work in steps."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    launcher = [sys.executable, "-m"]
    if nproc > 1:
        full_env.setdefault("OMP_NUM_THREADS", "1")
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd = [*launcher, "nfm", *map(str, args)]
    if background:
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=out, text=True)
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"nfm {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nfm_on_machines(*args, machines: int = 2, cwd=None, port: int | None = None) -> list[subprocess.Popen]:
    """`nfm ARGS` as `machines` machines of one process each, as a multi-node launch starts it (torchrun
    --nnodes N --node_rank K, one rendezvous over the loopback, gloo): a Popen per machine, output piped."""
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={machines}", "--nproc_per_node=1",
              "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    return [
        subprocess.Popen([*launch, f"--node_rank={k}", "-m", "nfm", *map(str, args)], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for k in range(machines)
    ]  # fmt: skip


def run_nfm_inline(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`nfm ARGS` in this process, for commands refused on their input before any work is done: the same
    `main` as the console command (exit status, stdout, stderr), without a new interpreter's ~3 s start.
    Commands that train, build or log belong in run_nfm's subprocess."""
    from nfm.pipeline.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(cwd or here)
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os.chdir(here)
    return subprocess.CompletedProcess(["nfm", *map(str, args)], code, out.getvalue(), err.getvalue())


def caches(root):
    """The pair-cache directories under a cache root (not its lock files)."""
    return sorted(d for d in root.iterdir() if d.is_dir())


def make_flow(
    channels=1, img_size=8, patch_size=2, num_classes=0, dtype=torch.float64, seed=0, randomize=True, **kw
) -> TarFlow:
    """A tiny TarFlow with non-trivial weights (the output projections are random, not zero)."""
    torch.manual_seed(seed)
    size = {**TARFLOW_SIZES["tiny"], "patch_size": patch_size, **kw}
    cfg = TarFlowConfig(in_channels=channels, img_size=img_size, num_classes=num_classes, noise_std=0.1, **size)
    model = TarFlow(cfg).to(dtype)
    if randomize:
        with torch.no_grad():
            for block in model.blocks:
                block.proj_out.weight.normal_(0, 0.02)
                block.proj_out.bias.normal_(0, 0.02)
    return model.eval()


@pytest.fixture
def flow_factory():
    return make_flow


def make_teacher_export(path, seed=0, noise_std=0.1, width=32, blocks=2, data=None):
    """A small random (non-trivial) class-conditional digits teacher, saved as an export."""
    from nfm.core.data import DataConfig
    from nfm.teacher.export import save_export

    data = data or DataConfig(name="digits", held_out=0.9)
    torch.manual_seed(seed)
    cfg = TarFlowConfig(
        in_channels=1,
        img_size=8,
        patch_size=2,
        width=width,
        num_blocks=blocks,
        layers_per_block=1,
        head_dim=16,
        num_classes=10,
        noise_std=noise_std,
    )
    model = TarFlow(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.weight.normal_(0, 0.02)
            b.proj_out.bias.normal_(0, 0.02)
    save_export(model, path, step=0, extra={"data": data.__dict__})
    return path


def dies_on_call(monkeypatch, module, name: str, call: int = 3):
    """Patch module.name so that its `call`-th call raises KeyboardInterrupt (a process killed mid-way);
    returns the real function."""
    real, calls = getattr(module, name), [0]

    def dies(*a, **k):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, dies)
    return real


def reforge_shards(cache_dir, change, shards=None):
    """Rewrite a cache's shards with `change(columns) -> columns` and recompute every checksum in the index:
    damage that the bytes alone no longer show (what a forger who knows the file format does)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from nfm.pairs.format import INDEX_NAME, hash_file

    index = json.loads((cache_dir / INDEX_NAME).read_text())
    for i, entry in enumerate(index["shards"]):
        if shards is not None and i not in shards:
            continue
        path = cache_dir / entry["file"]
        with safe_open(str(path), "pt") as f:
            cols, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(change(cols), str(path), metadata=meta)
        sha, fast = hash_file(path)
        entry.update(bytes=path.stat().st_size, sha256=sha, xxh3_128=fast)
    (cache_dir / INDEX_NAME).write_text(json.dumps(index))


def make_student_export(path, data=None):
    """A small random (non-trivial velocity) class-conditional digits student, saved as an export."""
    from nfm.core.data import DataConfig
    from nfm.student.models import StudentModelConfig, build_student
    from nfm.student.train import FlowConfig, StudentRunConfig, save_student

    torch.manual_seed(0)
    mc = StudentModelConfig(arch="mlp", width=64, depth=2, num_classes=10).resolved(1, 8, 10)
    model = build_student(mc)
    with torch.no_grad():  # the zero-initialised output layer made random
        for p in model.parameters():
            p.normal_(0, 0.1)
    data = data or DataConfig(name="digits", held_out=0.9)
    save_student(model, path, 0, StudentRunConfig(model=mc, flow=FlowConfig(coupling="independent"), data=data))
    return path


USER_FLOW = textwrap.dedent(
    '''
    import hashlib
    import torch

    class ElementwiseFlow:
        """z = (x - mu_y) / s: a per-pixel affine flow with a class-dependent shift."""

        def __init__(self, scale=0.5, num_classes=10):
            g = torch.Generator().manual_seed(0)
            self.image_shape = (1, 8, 8)
            self.num_classes = num_classes
            self.noise_std = 0.1
            self.s = scale + 0.1 * torch.rand(1, 8, 8, generator=g)
            self.mu = 0.3 * torch.randn(num_classes, 1, 8, 8, generator=g)

        def _shift(self, y, n):
            return self.mu[y.clamp(min=0)] if y is not None else torch.zeros(n, 1, 8, 8)

        def encode(self, x, y):
            return (x - self._shift(y, len(x))) / self.s

        def decode(self, z, y):
            return z * self.s + self._shift(y, len(z))

        def fingerprint(self):
            return hashlib.sha256(self.s.numpy().tobytes() + self.mu.numpy().tobytes()).hexdigest()[:16]

    def make(scale=0.5):
        return ElementwiseFlow(scale=float(scale))

    def broken():
        return object()
    '''
)


@pytest.fixture
def user_flow_dir(tmp_path):
    """A directory holding userflow.py: a user's own (non-TarFlow) flow for python:userflow:make."""
    d = tmp_path / "userflow_pkg"
    d.mkdir()
    (d / "userflow.py").write_text(USER_FLOW)
    return d
