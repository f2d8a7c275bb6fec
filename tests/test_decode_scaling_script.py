"""scripts/jpeg_decode_scaling.py: decodes real JPEG bytes from a folder or a tar and reports a rate per
process count; bad paths and arguments are refused with a message."""
import importlib
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _script():
    # imported by name from scripts/ (on sys.path, which spawned workers inherit) so the pool can pickle its
    # functions
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("jpeg_decode_scaling")


def _jpegs(folder: Path, n=3):
    rng = np.random.default_rng(0)
    (folder / "cls").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / "cls" / f"{i}.jpg")
    (folder / "cls" / "notes.txt").write_text("not an image")
    if n > 2:  # the extension counts in any case
        (folder / "cls" / "2.jpg").rename(folder / "cls" / "2.JPEG")


def test_folder_and_tar_give_the_same_files_and_a_rate(tmp_path, capsys):
    s = _script()
    _jpegs(tmp_path / "imgs")
    with tarfile.open(tmp_path / "imgs.tar", "w") as t:
        t.add(tmp_path / "imgs", arcname="imgs")
    a, b = s.load(str(tmp_path / "imgs")), s.load(str(tmp_path / "imgs.tar"))
    assert len(a) == 3 and a == b
    rows = s.measure(str(tmp_path / "imgs.tar"), [1, 2], 4)
    assert [n for n, _ in rows] == [1, 2] and all(r > 0 for _, r in rows)
    assert s.main([str(tmp_path / "imgs"), "--procs", "1", "--per-proc", "2"]) == 0
    assert "processes  1:" in capsys.readouterr().out


def test_bad_input_is_refused(tmp_path, capsys):
    s = _script()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .jpg"):
        s.main([str(tmp_path / "empty")])
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(SystemExit, match="neither a folder nor a .tar"):
        s.main([str(tmp_path / "x.bin")])
    _jpegs(tmp_path / "imgs", 1)
    with pytest.raises(SystemExit):
        s.main([str(tmp_path / "imgs"), "--procs", "two"])
    assert "--procs must be comma-separated integers" in capsys.readouterr().err
