"""A trained student as a noise -> data map, for reflow pair caches (`nfm pairs build --from-student RUN`).

Reflow (Rectified Flow, Liu et al. 2022) trains a new flow on pairs (z, ODE(z)) of a trained one: the pairs
are deterministic, so the new flow's paths do not cross and it needs fewer steps. pairs.reflow writes them
into the pair-cache format; this module is the `pairs.reflow.Generator` it is given.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from nfm.core.errors import NFMError
from nfm.core.io import sha256_file
from nfm.student.paths import ProbPath
from nfm.student.sampling import Solver, fixed_nfe, sample_ode
from nfm.student.train import load_student


class StudentGenerator:
    """x = sample_ode(student, z, y) with a fixed solver: what a reflow cache stores for each z."""

    def __init__(
        self, path: str | Path, device="cpu", solver: Solver = "dopri5", steps: int = 32, guidance: float = 0.0
    ):
        self.model, self.meta = load_student(path, device)
        flow = self.meta["flow"]
        if flow.get("source", "gaussian") != "gaussian":
            raise NFMError(
                f"the student {path} starts from {flow['source']}, not N(0, I): reflow pairs are built from "
                "noise; retrain it with flow.source=gaussian"
            )
        mc = self.meta["model"]
        self.image_shape = (mc["in_channels"], mc["img_size"], mc["img_size"])
        self.num_classes = int(mc["num_classes"])
        self.prior = ProbPath.from_flow(flow).prior_scale
        self.path, self.solver, self.steps, self.guidance = str(path), solver, steps, guidance
        export = Path(path) / "export" if (Path(path) / "export" / "model.safetensors").is_file() else Path(path)
        self._weights = sha256_file(export / "model.safetensors")
        self.nfe: list[int] = []  # NFE of each generate() call

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x, stats = sample_ode(
            self.model, z, y, solver=self.solver, steps=self.steps, guidance=self.guidance,
            prior_scale=self.prior, num_classes=self.num_classes,
        )  # fmt: skip
        self.nfe.append(stats["nfe"])
        return x

    def fingerprint(self) -> str:
        settings = {"solver": self.solver, "steps": None if self.solver == "dopri5" else self.steps,
                    "guidance": self.guidance, "model": self.meta["model"], "flow": self.meta["flow"]}  # fmt: skip
        if self.solver == "heun":  # heun's last step became Euler (issue 25): its caches from before differ
            settings["heun"] = "last-step-euler"
        h = hashlib.sha256(self._weights.encode())
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def provenance(self) -> dict[str, Any]:
        data = self.meta.get("data") or {}
        return {
            "path": str(Path(self.path).resolve()),
            "weights_sha256": self._weights,
            "coupling": self.meta["flow"].get("coupling"),
            "solver": self.solver,
            "steps": None if self.solver == "dopri5" else self.steps,
            "nfe": "adaptive" if self.solver == "dopri5" else fixed_nfe(self.solver, self.steps),
            "guidance": self.guidance,
            "data_name": data.get("name", "?"),
        }
