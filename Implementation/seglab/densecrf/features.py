"""The features the dense CRF's two kernels filter over, as pydensecrf's DenseCRF2D builds them,
and the message normalisations it offers: shared by the tensor-op lattice (torch_crf.py) and the
compiled one (permutohedral_numba.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# "after" (Krähenbühl 2011, DeepLab's binary), "symmetric" (pydensecrf's default), and the
# other two pydensecrf accepts (torch_crf.py's docstring says what each computes)
NORMALIZATIONS = ("after", "symmetric", "before", "none")


def kernel_features(height: int, width: int, xy_std: float, image: Optional[Tensor] = None,
                    rgb_std: float = 1.0, device=None) -> Tensor:
    """(H*W, 2 or 5) float32 features, pixels row-major, as DenseCRF2D builds them:
    (x, y) / xy_std, then (r, g, b) / rgb_std when an (H, W, 3) image is given."""
    if xy_std <= 0 or (image is not None and rgb_std <= 0):
        raise ValueError(f"kernel standard deviations must be > 0, got xy {xy_std}, rgb {rgb_std}")
    dev = image.device if image is not None else device
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=dev),
                          torch.arange(width, dtype=torch.float32, device=dev), indexing="ij")
    xy = torch.tensor(xy_std, dtype=torch.float32, device=dev)     # the C++ divides by a float
    columns = [x.reshape(-1) / xy, y.reshape(-1) / xy]
    if image is not None:
        rgb = image.reshape(-1, 3).float() / torch.tensor(rgb_std, dtype=torch.float32, device=dev)
        columns += [rgb[:, 0], rgb[:, 1], rgb[:, 2]]
    return torch.stack(columns, 1)
