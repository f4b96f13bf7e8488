"""logit_cache.py: float16 round trip, atomic files, clear errors, and the upsample-and-crop
against a bilinear interpolation written out by hand."""
import numpy as np
import pytest
import torch

from seglab.data.logit_cache import LogitCacheError, cache_path, cached_ids, load_logits, save_logits
from seglab.models.resize import full_resolution_logits


def test_round_trip_is_float16_exact(tmp_path):
    logits = torch.randn(5, 9, 11) * 20
    path = save_logits(tmp_path / "cache" / "2007_000033.npz", logits, (65, 81), (60, 77))
    assert path == cache_path(tmp_path / "cache", "2007_000033")
    loaded, input_size, size = load_logits(path)
    assert loaded.dtype == torch.float32 and loaded.shape == (5, 9, 11)
    torch.testing.assert_close(loaded, logits.half().float(), rtol=0, atol=0)
    assert input_size == (65, 81) and size == (60, 77)
    with np.load(path) as data:
        assert data["logits"].dtype == np.float16
    assert sorted(p.name for p in path.parent.iterdir()) == ["2007_000033.npz"]  # no temp files
    save_logits(tmp_path / "cache" / "2007_000001.npz", logits.numpy(), (65, 81), (65, 81))
    assert cached_ids(tmp_path / "cache") == ["2007_000001", "2007_000033"]


def test_bad_input_and_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="larger"):
        save_logits(tmp_path / "a.npz", np.zeros((2, 3, 3)), (17, 17), (18, 10))
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        save_logits(tmp_path / "a.npz", np.zeros((3, 3)), (17, 17), (17, 17))
    missing = tmp_path / "nope.npz"
    with pytest.raises(LogitCacheError, match="not found: .*nope.npz"):
        load_logits(missing)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(LogitCacheError, match="corrupt.*corrupt.npz"):
        load_logits(corrupt)
    incomplete = tmp_path / "incomplete.npz"
    np.savez(incomplete, logits=np.zeros((2, 3, 3), np.float16))  # no sizes
    with pytest.raises(LogitCacheError, match="incomplete.npz"):
        load_logits(incomplete)
    with pytest.raises(LogitCacheError, match="not found"):
        cached_ids(tmp_path / "no_such_folder")


def bilinear_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Caffe's Interp by hand: output pixel i samples input position i * (in - 1) / (out - 1)."""
    c, h, w = x.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y, xx = i * (h - 1) / (out_h - 1), j * (w - 1) / (out_w - 1)
            y0, x0 = min(int(y), h - 2), min(int(xx), w - 2)
            dy, dx = y - y0, xx - x0
            out[:, i, j] = ((1 - dy) * (1 - dx) * x[:, y0, x0] + (1 - dy) * dx * x[:, y0, x0 + 1]
                            + dy * (1 - dx) * x[:, y0 + 1, x0] + dy * dx * x[:, y0 + 1, x0 + 1])
    return out


def test_full_resolution_is_caffe_zoom_then_top_left_crop():
    logits = torch.randn(3, 4, 5, dtype=torch.float64).float()
    full = full_resolution_logits(logits, (25, 33), (22, 30))        # zoom x8: 4 -> 25, 5 -> 33
    want = bilinear_align_corners(logits.double().numpy(), 25, 33)[:, :22, :30]
    assert full.shape == (3, 22, 30) and full.is_contiguous()
    np.testing.assert_allclose(full.numpy(), want, atol=1e-5)
    # zoom x8 with align_corners: every 8th output pixel is exactly an input pixel
    torch.testing.assert_close(full[:, ::8, ::8], logits[:, :3, :4], rtol=0, atol=1e-6)
    # the published port's mode resizes the whole image with align_corners=False
    port = full_resolution_logits(logits, (22, 30), (22, 30), interp="pytorch")
    torch.testing.assert_close(port, torch.nn.functional.interpolate(
        logits[None], size=(22, 30), mode="bilinear", align_corners=False)[0])
    with pytest.raises(ValueError, match="larger"):
        full_resolution_logits(logits, (25, 33), (26, 30))
