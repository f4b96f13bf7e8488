"""The dense CRF's parameters (defaults = the paper's ResNet-101 VOC values) and the search grid.

The model: E(x) = sum_i -log P(x_i) + sum_{i<j} [x_i != x_j] (w_bi exp(-|p_i-p_j|^2 / 2
theta_alpha^2 - |I_i-I_j|^2 / 2 theta_beta^2) + w_pos exp(-|p_i-p_j|^2 / 2 theta_gamma^2)),
solved by `iterations` mean-field updates. Defaults (the released ResNet-101 settings; see
docs/fidelity.md): 10 iterations, w_bi=4, theta_alpha=67, theta_beta=3, w_pos=3, theta_gamma=1.

Label compatibility: `compat` None is the Potts model above. A C x C symmetric matrix mu
replaces [x_i != x_j] by mu(x_i, x_j), shared by both kernels (each still scaled by its weight),
as CRF-as-RNN learns it (Zheng et al. 2015; `crf.py learn --compat full`). Potts = 1 - identity.

Normalisation: DeepLab's CRF binary is built on the 2011 code, which normalises each message
after filtering; that is pydensecrf's NORMALIZE_AFTER, our default ("after"). pydensecrf's own
default is NORMALIZE_SYMMETRIC ("symmetric"), as used by the published PyTorch port.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

NORMALIZATIONS = {"after": "NORMALIZE_AFTER", "symmetric": "NORMALIZE_SYMMETRIC"}

# What runs the mean field: pydensecrf (C++), or the pure-PyTorch lattice of torch_crf.py with
# float32 values (labels exact to float rounding) or float16 ones (faster, not exact), or the
# numba-compiled lattice with the mean field fused around it (permutohedral_numba.py; CPU, exact).
BACKENDS = ("pydensecrf", "torch", "torch-fp16", "numba")


def is_torch_backend(backend: str) -> bool:
    """The backends that run on a torch device (cpu, cuda)."""
    return backend.startswith("torch")

# The paper's first-round search ranges (MATLAB [3:6], [30:10:100], [3:6]): 128 settings.
PAPER_GRID = {"bi_w": [3, 4, 5, 6], "bi_xy_std": list(range(30, 101, 10)),
              "bi_rgb_std": [3, 4, 5, 6]}


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters. bi_* = the bilateral (appearance) kernel: weight w_bi, position
    std theta_alpha (px), colour std theta_beta; pos_* = the Gaussian (smoothness) kernel:
    weight w_pos, position std theta_gamma (px). `iterations=0` means no CRF: Q is the softmax
    of the network's logits."""
    iterations: int = 10
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    normalization: str = "after"
    compat: tuple | None = None     # None: Potts; else a C x C symmetric matrix (tuple of rows)

    def __post_init__(self):
        if self.compat is not None:
            object.__setattr__(self, "compat", check_compat(self.compat))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("normalization", "compat"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise ValueError(f"CRF parameter {f.name} must be a finite number, got {value!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, "
                             f"got {self.normalization!r}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {self.iterations}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("bi_w", "pos_w"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.compat is not None:
            d["compat"] = [list(row) for row in self.compat]
        return d

    def compat_matrix(self, num_classes: int):
        """The compatibility as a (C, C) float64 numpy array (Potts: 1 - identity), checked
        against the number of labels."""
        import numpy as np
        if self.compat is None:
            return 1.0 - np.eye(num_classes)
        if len(self.compat) != num_classes:
            raise ValueError(f"the CRF compatibility matrix is {len(self.compat)}x"
                             f"{len(self.compat)} but the logits have {num_classes} labels")
        return np.array(self.compat, dtype=np.float64)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path) -> "CRFParams":
        """Read parameters written by `to_json` (e.g. the search's best.json)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"CRF parameter file not found: {path}. Create one with "
                                    "`python Implementation/crf.py search` (its best.json).")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read CRF parameters from {path}: {e}") from e
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - fields:
            extra = sorted(set(data) - fields) if isinstance(data, dict) else data
            raise ValueError(f"{path} is not a CRF parameter file: unexpected {extra}; "
                             f"the keys are {sorted(fields)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad CRF parameters in {path}: {e}") from e


def check_compat(compat) -> tuple:
    """A label compatibility matrix as a tuple of C tuples of floats: square, finite,
    symmetric (to 1e-6 of its largest entry), else ValueError."""
    try:
        rows = tuple(tuple(float(v) for v in row) for row in compat)
    except (TypeError, ValueError):
        raise ValueError(f"compat must be null (Potts) or a C x C matrix (a list of C lists of "
                         f"numbers), got {compat!r}") from None
    c = len(rows)
    if c == 0 or any(len(row) != c for row in rows):
        raise ValueError(f"compat must be a square C x C matrix, got rows of lengths "
                         f"{[len(row) for row in rows]}")
    if not all(math.isfinite(v) for row in rows for v in row):
        raise ValueError("compat must hold finite numbers")
    scale = max(1.0, max(abs(v) for row in rows for v in row))
    if any(abs(rows[i][j] - rows[j][i]) > 1e-6 * scale for i in range(c) for j in range(i)):
        raise ValueError("compat must be symmetric (mu(l, l') = mu(l', l))")
    return rows


def crf_params_from_config(section: dict) -> CRFParams:
    """The config's `crf` section as CRFParams: a `params` JSON file (e.g. a search's best.json)
    if one is named, with every field that differs from the paper's default applied on top."""
    base = CRFParams.from_json(section["params"]) if section.get("params") else CRFParams()
    paper = CRFParams()
    changed = {f.name: section[f.name] for f in dataclasses.fields(CRFParams)
               if f.name in section and section[f.name] != getattr(paper, f.name)}
    return dataclasses.replace(base, **changed)
