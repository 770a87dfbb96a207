import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.image_io import read_image, read_label_png


def rgb_block(height=4, width=5):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def as_hwc(tensor):
    assert tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


def test_rgb_png_is_exact(tmp_path):
    array = rgb_block()
    Image.fromarray(array).save(tmp_path / "a.png")
    assert np.array_equal(as_hwc(read_image(tmp_path / "a.png")), array)


def test_mode_l_replicates_gray(tmp_path):
    gray = np.array([[0, 17, 255], [128, 3, 64]], dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    out = as_hwc(read_image(tmp_path / "l.png"))
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_mode_la_drops_alpha(tmp_path):
    gray = np.array([[10, 200]], dtype=np.uint8)
    alpha = np.array([[0, 128]], dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA").save(tmp_path / "la.png")
    out = as_hwc(read_image(tmp_path / "la.png"))
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))  # not composited onto white or black


def test_mode_rgba_drops_alpha(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [1, 2, 3, 255]], [[9, 8, 7, 100], [0, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(as_hwc(read_image(tmp_path / "rgba.png")), rgba[:, :, :3])


def test_mode_p_applies_palette(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "p.png")
    expected = np.array([[[10, 20, 30], [200, 100, 50]], [[0, 255, 0], [200, 100, 50]]], dtype=np.uint8)
    assert np.array_equal(as_hwc(read_image(tmp_path / "p.png")), expected)


def test_mode_i16_keeps_top_8_bits(tmp_path):
    values = np.array([[0, 255, 256], [0x1234, 0xFF00, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = as_hwc(read_image(tmp_path / "i16.png"))
    expected = np.array([[0, 0, 1], [0x12, 0xFF, 0xFF]], dtype=np.uint8)  # PIL's convert would clip 256.. to 255
    assert np.array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))


def test_mode_cmyk_converts_like_pil(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [0, 0, 0, 255]], [[255, 0, 0, 0], [0, 255, 255, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    out = as_hwc(read_image(tmp_path / "c.tif"))
    assert out[0, 0].tolist() == [255, 255, 255]  # no ink -> white
    assert out[0, 1].tolist() == [0, 0, 0]  # full black -> black
    assert out[1, 0].tolist() == [0, 255, 255]  # cyan
    assert out[1, 1].tolist() == [255, 0, 0]  # magenta + yellow -> red
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "c.tif").convert("RGB")))


@pytest.mark.parametrize("orientation, rotate", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_applied(tmp_path, orientation, rotate):
    array = rgb_block(2, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(tmp_path / "e.png", exif=exif)
    out = as_hwc(read_image(tmp_path / "e.png"))
    assert np.array_equal(out, np.rot90(array, k=rotate))  # 6: rotate clockwise, 8: counter-clockwise


def test_exif_rotation_jpeg_swaps_size(tmp_path):
    array = np.zeros((16, 32, 3), dtype=np.uint8)
    array[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "e.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "e.jpg")
    assert tuple(out.shape) == (3, 32, 16)
    assert out[:, :8].float().mean() > 240 and out[:, 24:].float().mean() < 15  # left half became the top half


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.jpg"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match=r"label file not found: .*nope\.png"):
        read_label_png(tmp_path / "nope.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"full{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt image file .*cut") as info:
        read_image(truncated)
    assert "\n" not in str(info.value)


def test_unreadable_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"cannot read image file .*notes\.png") as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_label_png_keeps_raw_values(tmp_path):
    values = np.array([[0, 1, 150], [255, 254, 7]], dtype=np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "l.png")
    out = read_label_png(tmp_path / "l.png")
    assert out.dtype == np.uint8 and np.array_equal(out, values)

    palette = Image.fromarray(values, mode="P")
    palette.putpalette(list(range(256)) * 3)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_label_png(tmp_path / "p.png"), values)  # indices, not palette colours

    wide = np.array([[0, 26001], [24000, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    out = read_label_png(tmp_path / "w.png")
    assert out.dtype == np.int32 and np.array_equal(out, wide.astype(np.int32))

    rgb = rgb_block()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_label_png(tmp_path / "rgb.png"), rgb)


def test_label_png_rejects_rgba(tmp_path):
    Image.fromarray(np.zeros((2, 2, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"label file .*x\.png has image mode RGBA"):
        read_label_png(tmp_path / "x.png")
