"""labels.py: the VOC colour map, label PNG writing, and every bad image or mask as its DataError."""
import numpy as np
import pytest
from PIL import Image

from seglab.data import labels
from seglab.data.labels import IGNORE, VOC_CLASSES, DataError, load_label, rgb_to_label, save_label_png, voc_palette
from seglab.data.images import load_image


def devkit_colormap() -> np.ndarray:
    """VOClabelcolormap.m written another way: bit j of each of R, G, B, vectorised."""
    index = np.arange(256)
    cmap = np.zeros((256, 3), np.int64)
    for j in range(8):  # the j-th group of three bits goes to bit 7 - j of R, G, B
        for channel in range(3):
            cmap[:, channel] += ((index >> (3 * j + channel)) & 1) << (7 - j)
    return cmap.astype(np.uint8)


def random_label(rng, shape=(13, 17), num_classes=21):
    label = rng.integers(0, num_classes, shape).astype(np.uint8)
    label[rng.random(shape) < 0.1] = IGNORE
    return label


def test_classes_and_palette():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette, devkit_colormap())
    # a few colours everyone knows from VOC's SegmentationClass PNGs
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[20].tolist() == [0, 64, 128]
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette}) == 256


def test_rgb_to_label_inverts_palette_rendering():
    label = random_label(np.random.default_rng(1), (31, 23))
    np.testing.assert_array_equal(rgb_to_label(voc_palette()[label]), label)
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        rgb_to_label(np.full((2, 2, 3), (1, 2, 3), np.uint8))
    # class 21's colour is not a class colour when there are 21 classes
    with pytest.raises(ValueError, match="not VOC class colours"):
        rgb_to_label(voc_palette()[np.full((2, 2), 21)])
    with pytest.raises(ValueError):
        rgb_to_label(np.zeros((4, 4), np.uint8))


def test_save_label_png_round_trip(tmp_path):
    label = random_label(np.random.default_rng(2))
    path = save_label_png(tmp_path / "sub" / "a.png", label)
    assert path == tmp_path / "sub" / "a.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temp file left
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "P"
        np.testing.assert_array_equal(np.array(image), label)
        palette = np.array(image.getpalette()[:768], np.uint8).reshape(256, 3)
        np.testing.assert_array_equal(palette, voc_palette())
        np.testing.assert_array_equal(np.array(image.convert("RGB")), voc_palette()[label])
    np.testing.assert_array_equal(load_label(path, label.shape), label)
    with pytest.raises(ValueError, match="uint8"):
        save_label_png(tmp_path / "b.png", label.astype(np.int64))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_label_png(tmp_path / "b.png", np.zeros((2, 2, 3), np.uint8))
    assert not (tmp_path / "b.png").exists()


def test_atomic_output_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(RuntimeError):
        with labels.atomic_output(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with labels.atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_load_label_accepts_grayscale_void_and_unchecked_values(tmp_path):
    label = random_label(np.random.default_rng(3))
    Image.fromarray(label).save(tmp_path / "gray.png")  # mode "L"
    np.testing.assert_array_equal(load_label(tmp_path / "gray.png", label.shape), label)
    label[0, 0] = 40
    Image.fromarray(label).save(tmp_path / "forty.png")
    np.testing.assert_array_equal(load_label(tmp_path / "forty.png", num_classes=None), label)
    np.testing.assert_array_equal(load_label(tmp_path / "forty.png", num_classes=41), label)


# --- each bad input: its own error, naming the file ----------------------------------------

def test_rgb_mask_error_has_the_conversion_hint_and_the_hint_works(tmp_path):
    label = random_label(np.random.default_rng(4))
    path = tmp_path / "colour_mask.png"
    Image.fromarray(voc_palette()[label]).save(path)
    with pytest.raises(DataError) as info:
        load_label(path, label.shape)
    message = str(info.value)
    assert str(path) in message and "RGB" in message
    assert "colour-rendered" in message and "rgb_to_label" in message and "palette" in message
    # follow the hint: the converted file loads and holds the original indices
    save_label_png(path, rgb_to_label(np.asarray(Image.open(path).convert("RGB"))))
    np.testing.assert_array_equal(load_label(path, label.shape), label)


def test_rgba_mask_is_an_error_too(tmp_path):
    path = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(path)
    with pytest.raises(DataError, match="RGBA colour image") as info:
        load_label(path)
    assert str(path) in str(info.value)


def test_label_of_the_wrong_size(tmp_path):
    path = save_label_png(tmp_path / "small.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError) as info:
        load_label(path, image_size=(10, 13))
    message = str(info.value)
    assert str(path) in message and "12x10" in message and "13x10" in message
    assert "match its image" in message


def test_label_value_37(tmp_path):
    label = np.zeros((6, 7), np.uint8)
    label[2, 3] = 37
    label[1, 1] = IGNORE
    path = save_label_png(tmp_path / "v37.png", label)
    with pytest.raises(DataError) as info:
        load_label(path, (6, 7))
    message = str(info.value)
    assert str(path) in message and "[37]" in message and "0..20" in message
    assert "255" in message


@pytest.mark.parametrize("mode", ["I;16", "LA", "1", "F"])
def test_sixteen_bit_and_other_mode_masks(tmp_path, mode):
    path = tmp_path / f"mask_{mode.replace(';', '')}.{'tif' if mode == 'F' else 'png'}"
    values = np.arange(20).reshape(4, 5)
    if mode == "I;16":
        image = Image.fromarray(values.astype(np.uint16))
    elif mode == "F":
        image = Image.fromarray(values.astype(np.float32))
    else:
        image = Image.fromarray(values.astype(np.uint8)).convert(mode)
    image.save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(DataError) as info:
        load_label(path, (4, 5))
    message = str(info.value)
    assert str(path) in message and repr(mode) in message and "single-channel 8-bit" in message


def test_missing_label_names_the_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        load_label(tmp_path / "nope.png")
    assert str(tmp_path / "nope.png") in str(info.value)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(5)
    path = save_label_png(tmp_path / "whole.png", random_label(rng, (64, 64)))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) // 4, 60):
        broken = tmp_path / f"cut{cut}.png"
        broken.write_bytes(data[:cut])
        with pytest.raises(DataError) as info:
            load_label(broken)
        assert str(broken) in str(info.value) and "truncated" in str(info.value)
        with pytest.raises(DataError) as info:
            load_image(broken)
        assert str(broken) in str(info.value)


def jpeg_bytes(tmp_path, rng, shape=(40, 50, 3)):
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, quality=90)
    return path


def test_corrupt_and_truncated_jpeg(tmp_path):
    data = jpeg_bytes(tmp_path, np.random.default_rng(6)).read_bytes()
    cases = {"half.jpg": data[:len(data) // 2],
             "garbage.jpg": b"\xff\xd8\xff\xe0 this is not a JPEG stream" * 5,
             "text.jpg": b"hello, I am a text file\n",
             "empty.jpg": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as info:
            load_image(tmp_path / name)
        message = str(info.value)
        assert str(tmp_path / name) in message and "corrupt, truncated or not an image" in message
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.jpg")


# --- load_image: every image mode ends as (H, W, 3) uint8 RGB --------------------------------

def test_load_image_rgb_matches_pil(tmp_path):
    path = jpeg_bytes(tmp_path, np.random.default_rng(7))
    image = load_image(path)
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.asarray(Image.open(path).convert("RGB")))


def test_load_image_other_modes(tmp_path):
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    gray = rgb[:, :, 0]
    alpha = rng.integers(0, 256, (9, 11), dtype=np.uint8)

    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), np.stack([gray] * 3, axis=2))

    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)

    label = random_label(rng, (9, 11))
    save_label_png(tmp_path / "palette.png", label)
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png"), voc_palette()[label])

    deep = rng.integers(0, 65536, (9, 11)).astype(np.uint16)
    deep[0, 0], deep[0, 1], deep[0, 2] = 0, 65535, 257 * 100
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    got = load_image(tmp_path / "deep.png")
    expect = np.array([[int(v * 255 / 65535 + 0.5) for v in row] for row in deep.tolist()])
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack([expect] * 3, axis=2))
    assert got[0, :3, 0].tolist() == [0, 255, 100]

    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="floating-point") as info:
        load_image(tmp_path / "float.tif")
    assert str(tmp_path / "float.tif") in str(info.value)
