"""scripts/nvjpeg_under_load.py on the CPU: the output-plane layout nvJPEG is given per format, argument checks
that name the bad value and the valid ones, and a clean refusal without CUDA (the decoding itself is GPU-only
and was run on the H200, dataloading/NOTES.md)."""
import io
import tarfile

import pytest
import torch

from script_helpers import load_script


def _script():
    return load_script("nvjpeg_under_load")


def test_plane_layout_per_format():
    s = _script()
    # a 4:2:0 colour JPEG of 101 x 50: chroma planes at half size, rounded up
    widths, heights = [101, 51, 51, 0], [50, 25, 25, 0]
    assert s.plane_layout("rgbi", 3, widths, heights) == [(303, 50)]
    assert s.plane_layout("rgb", 3, widths, heights) == [(101, 50)] * 3
    assert s.plane_layout("yuv", 3, widths, heights) == [(101, 50), (51, 25), (51, 25)]
    assert s.plane_layout("unchanged", 3, widths, heights) == [(101, 50), (51, 25), (51, 25)]
    # a grey JPEG: one component; RGB output still fills three planes from the luminance
    grey_w, grey_h = [64, 0, 0, 0], [48, 0, 0, 0]
    assert s.plane_layout("yuv", 1, grey_w, grey_h) == [(64, 48)]
    assert s.plane_layout("unchanged", 1, grey_w, grey_h) == [(64, 48)]
    assert s.plane_layout("rgbi", 1, grey_w, grey_h) == [(192, 48)]
    with pytest.raises(ValueError, match="unknown output format 'nv12'"):
        s.plane_layout("nv12", 3, widths, heights)


def test_argument_lists():
    s = _script()
    assert s.parse_list("hw, hybrid", s.BACKENDS, "backend") == ["hw", "hybrid"]
    with pytest.raises(SystemExit, match="unknown backend cpu; valid: hw, gpu_hybrid, hybrid"):
        s.parse_list("hw,cpu", s.BACKENDS, "backend")
    with pytest.raises(SystemExit, match="unknown output format"):
        s.parse_list(",", s.FORMATS, "output format")
    assert s.parse_counts("1,4") == [1, 4]
    for bad in ("0", "two", ""):
        with pytest.raises(SystemExit, match="--threads takes positive integers"):
            s.parse_counts(bad)


def test_refuses_bad_input_before_any_work(tmp_path, capsys):
    s = _script()
    data = tmp_path / "d.tar"
    with tarfile.open(data, "w") as t:
        blob = b"\xff\xd8 not really a jpeg"
        info = tarfile.TarInfo("a.jpg")
        info.size = len(blob)
        t.addfile(info, io.BytesIO(blob))
    out = tmp_path / "r.txt"
    with pytest.raises(SystemExit, match="unknown backend nvdec"):
        s.main([str(data), "--out", str(out), "--backends", "nvdec"])
    with pytest.raises(SystemExit):
        s.main([str(data), "--out", str(out), "--batch", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            s.main([str(data), "--out", str(out)])
    assert not out.exists()  # nothing written before the checks pass
    out.write_text("an earlier result")
    with pytest.raises(SystemExit):
        s.main([str(data), "--out", str(out)])
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "an earlier result"  # refused, not overwritten


def test_find_libnvjpeg_returns_real_files():
    for path in _script().find_libnvjpeg():  # none on the CPU box; on a GPU box torchvision's or the toolkit's
        assert "libnvjpeg" in path and "/stubs/" not in path
