"""`ivl-plan` / `python -m ivl_vision.plan_cli`, run as a subprocess the way a user runs it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support.hostile_images import png_bomb


def _run(*args: str, entry: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = entry or [sys.executable, "-m", "ivl_vision.plan_cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, check=False)


def test_size_prints_the_plan() -> None:
    result = _run("--size", "286x1560", "--max-tiles", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"grid": [1, 6], "num_tiles": 7, "resize": [448, 2688]}\n'


def test_options_and_several_inputs(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (1920, 1080), (90, 120, 200)).save(photo)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = tmp_path / "rotated.jpg"
    Image.new("RGB", (1920, 1080)).save(rotated, exif=exif.tobytes())
    result = _run(str(photo), str(rotated), "--size", "1x1", "--max-tiles", "12")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [
        {"grid": [1, 1], "num_tiles": 1, "resize": [448, 448]},  # --size values come first
        {"grid": [4, 2], "num_tiles": 9, "resize": [1792, 896]},
        {"grid": [2, 4], "num_tiles": 9, "resize": [896, 1792]},  # EXIF 8: shown upright, portrait
    ]
    no_thumb = _run("--size", "1920x1080", "--no-thumbnail", "--image-size", "224", "--min-tiles", "2")
    assert json.loads(no_thumb.stdout) == {"grid": [4, 2], "num_tiles": 8, "resize": [896, 448]}
    as_stored = _run(str(rotated), "--no-exif-orientation")
    assert json.loads(as_stored.stdout)["grid"] == [4, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "12by5"], "is not WIDTHxHEIGHT"),
        (["--size", "0x5"], "at least 1 pixel"),
        (["--size", "10x10", "--max-tiles", "41"], "max_tiles is 41; it must be between 1 and 40"),
        (["/no/such/file.png"], "No such file"),
        ([], "give at least one IMAGE_FILE"),
    ],
)
def test_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_bad_file_among_good_inputs(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(50000, 50000, complete=False))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = _run(str(bomb), str(text), "--size", "100x100")
    assert result.returncode == 2
    assert result.stdout.splitlines() == ['{"grid": [1, 1], "num_tiles": 1, "resize": [448, 448]}']
    assert "image is 50000x50000 = 2500.0 MP; the limit is 80.0 MP" in result.stderr
    assert "could not decode image" in result.stderr


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "ivl-plan"
    if not script.exists():
        pytest.skip("the ivl-plan console script is not installed in this environment")
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 1000)).save(buffer, "PNG")
    image = tmp_path / "wide.png"
    image.write_bytes(buffer.getvalue())
    result = _run(str(image), "--max-tiles", "6", entry=[str(script)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"grid": [3, 1], "num_tiles": 4, "resize": [1344, 448]}
