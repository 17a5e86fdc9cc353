"""`lgm detect` and `lgm ood` as a user deploys them (issue 33): the L-GM default, a folder of the user's own
images, adversarial inputs, saved detector files in `lgm ood`, and the numbers read the documented way."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import write_idx
from PIL import Image

from lgm_lab.config import config_from_preset
from lgm_lab.train import train


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LGM_DATA_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    src = write_idx(tmp_path_factory.mktemp("idx"), n_train=96, n_test=64)
    root = tmp_path_factory.mktemp("runs")
    for head in ("lgm", "softmax"):
        cfg = config_from_preset(None, epochs=1, subset=64, test_subset=32, batch_size=32, feat_dim=2, head=head,
                                 data_dir=str(src))
        train(cfg, root / head, progress=False)
    return root


def _lgm(*args):
    return subprocess.run([sys.executable, "-m", "lgm_cli.app", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def test_detect_fit_defaults_to_the_heads_gaussians_for_lgm_and_tied_otherwise(runs, tmp_path):
    from lgm_lab.detector_file import load_detector_file

    for head, kind in (("lgm", "head"), ("softmax", "tied")):
        r = _lgm("detect", "fit", runs / head / "checkpoint.pt", "--out", tmp_path / f"{head}.pt", "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        _det, info = load_detector_file(tmp_path / f"{head}.pt")
        assert info["covariance"] == kind


def test_detect_score_takes_the_users_images_and_adversarial_inputs(runs, tmp_path):
    det = tmp_path / "det.pt"
    assert _lgm("detect", "fit", runs / "lgm" / "checkpoint.pt", "--out", det, "--no-progress").returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    for i, mode in enumerate(("RGB", "L", "RGBA")):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (50, 40, 3), dtype=np.uint8)).convert(mode).save(
            mine / f"{i}.{'jpg' if mode == 'L' else 'png'}")
    (mine / "notes.txt").write_text("not an image: skipped")
    r = _lgm("detect", "score", det, runs / "lgm" / "checkpoint.pt", "--data", "fashion-mnist", "--images", mine,
             "--attack", "pgd", "--eps", "0.3", "--json", tmp_path / "s.json", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())["results"]
    assert res[f"images in {mine}"]["images"] == 3
    adv = res["PGD-10 eps 0.3"]
    assert 0 <= adv["misclassified_and_accepted_percent"] <= adv["misclassified_percent"] <= 100
    assert "misclassified and accepted" in r.stdout
    # the user's images exactly as the dataset's: grey, 28x28, in [0, 1]
    from lgm_lab.ood_data import image_folder

    x = image_folder(mine, channels=1, size=28).images
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    for folder, word in ((bad, "not a readable image"), (tmp_path / "none", "not a folder"), (tmp_path, "no image")):
        r = _lgm("detect", "score", det, runs / "lgm" / "checkpoint.pt", "--images", folder, "--no-progress")
        assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ood_measures_saved_detector_files_of_its_checkpoints(runs, tmp_path):
    maha = tmp_path / "maha.pt"
    assert _lgm("detect", "fit", runs / "softmax" / "checkpoint.pt", "--out", maha, "--no-progress").returncode == 0
    tiny = ("--subset", 32, "--fit-subset", 64, "--attack-subset", 4, "--eps", "0.1", "--no-progress")
    r = _lgm("ood", runs / "softmax" / "checkpoint.pt", runs / "lgm" / "checkpoint.pt", "--detector", maha, "--out",
             tmp_path / "o", "--no-adaptive", *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert "maha.pt (tied)" in res["softmax"]["detectors"] and "maha.pt (tied)" not in res["lgm-a1"]["detectors"]
    # a saved tied detector fitted to the same 64 training images ranks as the protocol's own Mahalanobis
    ours, saved = (res["softmax"]["detectors"][k]["sets"]["noise"]["auroc"] for k in ("Mahalanobis", "maha.pt (tied)"))
    assert abs(ours - saved) < 1e-6
    r = _lgm("ood", runs / "lgm" / "checkpoint.pt", "--detector", maha, "--out", tmp_path / "o2", "--no-adaptive",
             *tiny)
    assert r.returncode == 2 and "fitted to none of the checkpoints" in r.stderr, r.stderr
    assert not (tmp_path / "o2").exists()
