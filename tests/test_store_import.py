"""`tokenlabel labels import|info`: reference .pt files -> store, bad files, the summary."""
import argparse
import json

import numpy as np
import pytest
import torch

from tokenlabel.cli import main
from tokenlabel.dataloading.store import LabelStore


def _reference_map(gen, c, k, s, boost=None):
    """One label map the way generate_label.py writes it: top-k of dense logits, [2, k, S, S] fp16."""
    logits = torch.randn(c, s, s, generator=gen) * 3
    if boost is not None:
        logits[boost] += 50
    values, indices = torch.topk(logits, k, dim=0)
    return torch.stack([values, indices.float()]).half()


def _write_reference_tree(root, gen, wnids, per, c, k, s, boost=None):
    maps = {}
    for w in wnids:
        (root / w).mkdir(parents=True)
        for j in range(per):
            stem = f"{w}_{int(torch.randint(10**6, (1,), generator=gen))}{j}"
            t = _reference_map(gen, c, k, s, boost)
            torch.save(t, root / w / f"{stem}.pt")
            maps[f"{w}/{stem}"] = t
    return maps


@pytest.mark.parametrize("c,k,s", [(1000, 5, 18), (37, 1, 6)])
def test_import_round_trip(tmp_path, gen, capsys, c, k, s):
    maps = _write_reference_tree(tmp_path / "src", gen, ["n01440764", "n01443537"], 4, c, k, s)
    assert main(["labels", "import", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "st"),
                 "--num-classes", str(c), "--no-progress"]) == 0
    assert "imported 8 of 8" in capsys.readouterr().out
    st = LabelStore.open(tmp_path / "st")
    assert (len(st), st.num_classes, st.k, st.size, st.num_done) == (8, c, k, s, 8)
    for stem, t in maps.items():
        v, i = st.read_paths([f"{stem}.JPEG"])
        np.testing.assert_array_equal(v[0], t[0].numpy())
        np.testing.assert_array_equal(i[0], t[1].long().numpy())
    assert st.provenance["source"] == "reference .pt import"
    # refuses to clobber without --overwrite
    assert main(["labels", "import", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "st"),
                 "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_import_matches_real_image_names(tmp_path, gen, capsys):
    maps = _write_reference_tree(tmp_path / "src", gen, ["n02", "n03"], 3, 50, 2, 5)
    stems = sorted(maps)
    for st_ in stems[:-1]:  # the last .pt has no image
        d, name = st_.split("/")
        (tmp_path / "img" / d).mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if hash(name) % 2 else ".JPEG"
        (tmp_path / "img" / d / f"{name}{ext}").write_bytes(b"x")
    (tmp_path / "img" / "n02" / "unlabelled.JPEG").write_bytes(b"x")
    assert main(["labels", "import", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "st"),
                 "--num-classes", "50", "--images", str(tmp_path / "img"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 label file(s) match no image" in err and stems[-1] in err
    st = LabelStore.open(tmp_path / "st")
    assert len(st) == 5 and st.num_done == 5
    for stem in stems[:-1]:
        real = [p for p in st.paths if p.rsplit(".", 1)[0] == stem]
        assert len(real) == 1 and (tmp_path / "img" / real[0]).exists()
        np.testing.assert_array_equal(st.read_paths(real)[1][0], maps[stem][1].long().numpy())
    assert st.missing(["n02/unlabelled.JPEG"]) == ["n02/unlabelled.JPEG"]


def test_bad_files_are_reported_and_skipped(tmp_path, gen, capsys):
    c, k, s = 20, 3, 4
    maps = _write_reference_tree(tmp_path / "src", gen, ["a"], 3, c, k, s)
    bad_dir = tmp_path / "src" / "b"
    bad_dir.mkdir()
    (bad_dir / "garbage.pt").write_bytes(b"not a torch file")
    torch.save(_reference_map(gen, c, k, s + 1), bad_dir / "wrong_size.pt")
    torch.save(torch.randn(3, k, s, s).half(), bad_dir / "wrong_rank.pt")
    out_of_range = _reference_map(gen, c, k, s)
    out_of_range[1, 0, 0, 0] = c
    torch.save(out_of_range, bad_dir / "out_of_range.pt")
    fractional = _reference_map(gen, c, k, s)
    fractional[1, 1, 2, 3] = 2.5
    torch.save(fractional, bad_dir / "fractional.pt")
    torch.save({"x": torch.zeros(1)}, bad_dir / "a_dict.pt")
    torch.save(argparse.Namespace(a=1), bad_dir / "unsafe.pt")  # refused by weights_only
    assert main(["labels", "import", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "st"),
                 "--num-classes", str(c), "--no-progress", "-j", "2"]) == 1
    cap = capsys.readouterr()
    assert "imported 3 of 10" in cap.out and "7 bad" in cap.out
    for name, why in [("garbage", "cannot load"), ("wrong_size", "the store holds [2, 3, 4, 4]"),
                      ("wrong_rank", "expected [2, k, S, S]"), ("out_of_range", "outside [0, 20)"),
                      ("fractional", "not whole numbers"), ("a_dict", "holds a dict"), ("unsafe", "cannot load")]:
        line = next((ln for ln in cap.err.splitlines() if f"b/{name}.pt" in ln), "")
        assert why in line, (name, cap.err)
    st = LabelStore.open(tmp_path / "st")
    assert sorted(st.missing(st.paths)) == sorted(f"b/{n}.JPEG" for n in
                                                  ["garbage", "wrong_size", "wrong_rank", "out_of_range",
                                                   "fractional", "a_dict", "unsafe"])
    for stem, t in maps.items():
        np.testing.assert_array_equal(st.read_paths([stem + ".JPEG"])[0][0], t[0].numpy())


def test_info_output(tmp_path, gen, capsys):
    _write_reference_tree(tmp_path / "src", gen, ["w1", "w2", "w3"], 3, 100, 4, 6, boost=17)
    assert main(["labels", "import", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "st"),
                 "--num-classes", "100", "--no-progress"]) == 0
    st = LabelStore.open(tmp_path / "st", mode="r+")
    st.mark_not_done([0])
    capsys.readouterr()
    assert main(["labels", "info", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    for needle in ["classes C      100", "top-k          4", "map size S     6 x 6", "images         9",
                   "done           8 (88.9%)", "values float16, indices int16", "allocated",
                   "classes present       1 of 100", "most common           17: 100.00%"]:
        assert needle in out, (needle, out)
    assert f"not done, e.g. {st.paths[0]}" in out
    assert main(["labels", "info", str(tmp_path / "st"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["done"] == 8 and info["histogram"]["top1_most_common"] == [[17, 1.0]]
    assert info["histogram"]["all_k_ids_classes_present"] > 4
    assert main(["labels", "info", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
