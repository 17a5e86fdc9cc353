"""A user's images read as they are (issue 42): scaled by their bit depth (8-bit, 16-bit, float), a
decompression bomb refused before it is decoded, a damaged file one reason, and in a folder the readable
images read while each unreadable one is named."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lgm_lab.ood_data import external_ood_set, image_folder, read_image


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` 8-bit grey pixels (a few hundred bytes: a decompression bomb's
    header; PIL must refuse it before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
                     + chunk(b"IEND", b""))


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG was clipped: 99.5% of its pixels became 1.0."""
    ramp = (np.arange(28 * 28, dtype=np.float64).reshape(28, 28) / (28 * 28 - 1) * 65535).round().astype(np.uint16)
    for suffix in ("png", "tif"):
        Image.fromarray(ramp).save(tmp_path / f"ramp16.{suffix}")
        x = read_image(tmp_path / f"ramp16.{suffix}", channels=1, size=28)
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        torch.testing.assert_close(x[0], torch.from_numpy(ramp / 65535.0).float(), atol=1e-6, rtol=0)
        assert float((x == 1.0).float().mean()) < 0.01
    # the same picture at 8 bits reads the same, within the 8-bit rounding; grey repeated for RGB models
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "ramp8.png")
    x8 = read_image(tmp_path / "ramp8.png", channels=3, size=28)
    x16 = read_image(tmp_path / "ramp16.png", channels=3, size=28)
    assert x16.shape == (3, 28, 28) and float((x8 - x16).abs().max()) < 1 / 255 + 1e-6
    # a float TIFF is read as it is, in [0, 1]; outside [0, 1] (or not finite) it is refused, never clipped
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(tmp_path / "f.tif")
    torch.testing.assert_close(read_image(tmp_path / "f.tif", channels=1, size=28)[0],
                               torch.from_numpy(ramp / 65535.0).float())
    Image.fromarray((ramp / 65535.0 * 255).astype(np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(ValueError, match=r"not in \[0, 1\]"):
        read_image(tmp_path / "f255.tif", channels=1, size=28)
    # a 32-bit integer TIFF by its 32 bits
    Image.fromarray(ramp.astype(np.int32) * 1000).save(tmp_path / "i32.tif")
    x = read_image(tmp_path / "i32.tif", channels=1, size=28)
    assert float(x.max()) == pytest.approx(65535 * 1000 / (2**32 - 1), rel=1e-5)


@pytest.mark.parametrize("side", [20000, 10000])
def test_a_decompression_bomb_is_one_reason_and_skipped_in_a_folder(tmp_path, side):
    """A 20000x20000 PNG raised PIL's DecompressionBombError through image_folder (a traceback); one of
    10000x10000 (above PIL's warning limit) would be decoded, 100 M pixels."""
    bomb = tmp_path / "imgs" / "bomb.png"
    bomb.parent.mkdir()
    _png_header_only(bomb, side, side)
    with pytest.raises(ValueError, match="decompression bomb") as err:
        read_image(bomb, channels=1, size=28)
    assert f"{side * side:,} pixels" in str(err.value)
    with pytest.raises(ValueError, match=f"--images {bomb}: .*decompression bomb"):
        image_folder(bomb, channels=1, size=28)
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(tmp_path / "imgs" / "ok.png")
    found = image_folder(tmp_path / "imgs", channels=1, size=28)
    assert found.images.shape == (1, 1, 28, 28) and [p.name for p in found.files] == ["ok.png"]
    assert [(p.name, "decompression bomb" in why) for p, why in found.skipped] == [("bomb.png", True)]
    name, x, skipped = external_ood_set(str(tmp_path / "imgs"), (1, 28, 28))
    assert len(x) == 1 and [p.name for p, _ in skipped] == ["bomb.png"]
    bomb2 = tmp_path / "imgs" / "z.png"
    bomb2.write_bytes(bomb.read_bytes())
    ok = tmp_path / "imgs" / "ok.png"
    ok.unlink()
    with pytest.raises(ValueError, match="--ood-data .* none of its 2 images could be read"):
        external_ood_set(str(tmp_path / "imgs"), (1, 28, 28))


def test_damaged_images_are_one_reason_never_an_exception_of_the_decoder(tmp_path):
    """2 of 600 mutated TIFF/BMP images raised through image_folder (decoder errors that are not OSError)."""
    rng = np.random.default_rng(0)
    picture = (rng.random((24, 20, 3)) * 255).astype(np.uint8)
    outcomes = {"read": 0, "refused": 0}
    for fmt in ("tiff", "bmp", "png", "gif"):
        Image.fromarray(picture).save(tmp_path / f"clean.{fmt}")
        clean = bytearray((tmp_path / f"clean.{fmt}").read_bytes())
        for i in range(60):
            data = bytearray(clean)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
            path = tmp_path / f"m{i}.{fmt}"
            path.write_bytes(bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))] if i % 3 == 0 else data))
            try:
                x = read_image(path, channels=1, size=28)
            except ValueError as err:
                assert "\n" not in str(err) and str(err)
                outcomes["refused"] += 1
            else:
                assert x.shape == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
                outcomes["read"] += 1
            path.unlink()
    assert outcomes["refused"] > 0 and outcomes["read"] > 0
