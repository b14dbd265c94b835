"""bench/machine.py's write_section: each benchmark owns one section of bench/RESULTS.md."""
from __future__ import annotations

import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
from machine import HEADER, write_section  # noqa: E402


def test_sections_are_added_replaced_and_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("unet_step cpu fp32", "## UNet\n\nfirst run\n", path)
    write_section("txt2img default cpu fp32", "## txt2img\n\n| a | b |\n", path)
    write_section("unet_step cpu fp32", "## UNet\n\nsecond run\n", path)
    text = path.read_text()
    assert text.startswith(HEADER)
    assert "first run" not in text and text.count("second run") == 1 and "| a | b |" in text
    assert text.index("second run") < text.index("| a | b |")  # a replaced section keeps its place
    assert text.count("<!-- begin unet_step cpu fp32 -->") == 1 and text.count("<!-- end unet_step cpu fp32 -->") == 1
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file and a rename
