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
    saved_name = "maha.pt (mahalanobis-l2)"
    assert saved_name in res["softmax"]["detectors"] and saved_name not in res["lgm-a1"]["detectors"]
    # the saved default detector fitted to the same 64 training images ranks as the protocol's own Mahalanobis-L2
    ours, saved = (res["softmax"]["detectors"][k]["sets"]["noise"]["auroc"]
                   for k in ("Mahalanobis (L2-normalised)", saved_name))
    assert abs(ours - saved) < 1e-6
    r = _lgm("ood", runs / "lgm" / "checkpoint.pt", "--detector", maha, "--out", tmp_path / "o2", "--no-adaptive",
             *tiny)
    assert r.returncode == 2 and "fitted to none of the checkpoints" in r.stderr, r.stderr
    assert not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- issue 41: every detector, deployed
def _images(folder, n=4, broken=True):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (30, 20), dtype=np.uint8)).save(
            folder / f"{i}.png")
    if broken:
        (folder / "z-broken.png").write_bytes(b"not a png")
    return folder


def test_detect_fit_names_every_detector_and_the_deployed_module_scores_as_the_command(runs, tmp_path):
    """Each registry detector that applies is fitted and saved by `lgm detect fit --detector NAME`, scored per
    image by `lgm detect score --images`, loaded from its file into a RejectingClassifier that gives the same
    scores and verdicts, and exported with a dynamic batch."""
    from lgm_ext import RejectingClassifier, detectors
    from lgm_lab.checkpoints import load_trained
    from lgm_lab.detector_file import load_detector_file
    from lgm_lab.ood_data import image_folder

    folder = _images(tmp_path / "mine", broken=False)
    for run in ("lgm", "softmax"):
        model, head, cfg, _ck = load_trained(runs / run / "checkpoint.pt")
        x, files, _ = image_folder(folder, channels=1, size=28)
        for name in [*detectors.names_for(head), "mahalanobis-l2+mahalanobis"]:
            out = tmp_path / f"{run}-{name}.pt"
            r = _lgm("detect", "fit", runs / run / "checkpoint.pt", "--detector", name, "--out", out, "--fpr", "0.1",
                     "--no-progress")
            assert r.returncode == 0, (name, r.stderr[-2000:])
            js = tmp_path / f"{run}-{name}.json"
            r = _lgm("detect", "score", out, runs / run / "checkpoint.pt", "--data", "none", "--images", folder,
                     "--json", js, "--no-progress")
            assert r.returncode == 0, (name, r.stderr[-2000:])
            rows = json.loads(js.read_text())["results"][f"images in {folder}"]["per_image"]
            det, info = load_detector_file(out)
            assert info["detector_name"] == name and type(det).__name__ == type(
                detectors.create(name, head, features=torch.randn(60, 2), labels=torch.arange(60) % 10,
                                 logits=torch.randn(60, 10))).__name__
            deployed = RejectingClassifier(model, head, det).eval()
            with torch.no_grad():
                logits, accepted, s = deployed(x, return_score=True)
            assert [r_["file"] for r_ in rows] == [p.name for p in files]
            # (float32 features from another process: the same up to rounding)
            torch.testing.assert_close(s.double(), torch.tensor([r_["score"] for r_ in rows], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-4)
            assert accepted.tolist() == [r_["accepted"] for r_ in rows], name
            assert logits.argmax(1).tolist() == [r_["predicted_class"] for r_ in rows]
            program = torch.export.export(deployed, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            with torch.no_grad():
                assert torch.equal(program.module()(x[:1])[1], deployed(x[:1])[1])


def test_detect_fit_defaults_to_the_recommended_detector_and_keeps_the_old_covariance_values(runs, tmp_path):
    from lgm_lab.detector_file import load_detector_file

    for head in ("lgm", "softmax"):
        r = _lgm("detect", "fit", runs / head / "checkpoint.pt", "--out", tmp_path / f"{head}.pt", "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        assert load_detector_file(tmp_path / f"{head}.pt")[1]["detector_name"] == "mahalanobis-l2"
    for cov, name in (("head", "lgm-likelihood"), ("tied", "mahalanobis"), ("diag", "gaussian-diag")):
        r = _lgm("detect", "fit", runs / "lgm" / "checkpoint.pt", "--covariance", cov, "--out", tmp_path / "c.pt",
                 "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        assert load_detector_file(tmp_path / "c.pt")[1]["detector_name"] == name
    for args, word in ((("--detector", "vim"), "does not apply"), (("--detector", "maha"), "unknown detector"),
                       (("--detector", "knn", "--covariance", "tied"), "not both")):
        r = _lgm("detect", "fit", runs / "lgm" / "checkpoint.pt", *args, "--out", tmp_path / "x.pt", "--no-progress")
        assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x.pt").exists()


def test_detect_score_gives_a_verdict_per_image_and_names_an_unreadable_one(runs, tmp_path):
    det = tmp_path / "det.pt"
    assert _lgm("detect", "fit", runs / "lgm" / "checkpoint.pt", "--out", det, "--no-progress").returncode == 0
    folder = _images(tmp_path / "mixed", n=3)
    r = _lgm("detect", "score", det, runs / "lgm" / "checkpoint.pt", "--data", "none", "--images", folder, "--csv",
             tmp_path / "t.csv", "--json", tmp_path / "t.json", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--images: skipped {folder / 'z-broken.png'}: not a readable "
                                                   "image"), lines
    res = json.loads((tmp_path / "t.json").read_text())["results"]
    assert list(res) == [f"images in {folder}"]  # --data none: the user's images only
    rows = res[f"images in {folder}"]["per_image"]
    assert [x["file"] for x in rows] == ["0.png", "1.png", "2.png"]
    assert res[f"images in {folder}"]["skipped"][0]["file"] == "z-broken.png"
    for row in rows:
        assert row["margin"] == pytest.approx(row["score"] - row["threshold"])
        assert row["accepted"] == (row["margin"] >= 0)
    for name in ("0.png", "1.png", "2.png"):
        assert name in r.stdout
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0] == "file,predicted_class,class_name,score,threshold,margin,accepted" and len(csv_lines) == 4
    r = _lgm("detect", "score", det, runs / "lgm" / "checkpoint.pt", "--data", "none", "--no-progress")
    assert r.returncode == 2 and "--images" in r.stderr


def test_detect_score_csv_never_replaces_a_users_file(runs, tmp_path):
    """--csv replaces only a table lgm detect score wrote: a user's file, one of the images it reads and a FIFO are
    refused before any work, and left as they were."""
    det = tmp_path / "det.pt"
    assert _lgm("detect", "fit", runs / "lgm" / "checkpoint.pt", "--out", det, "--no-progress").returncode == 0
    folder = _images(tmp_path / "mine", n=2, broken=False)
    mine = tmp_path / "notes.csv"
    mine.write_text("my own,table\n")
    image = folder / "0.png"
    before = image.read_bytes()
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for target, word in ((mine, "not a table"), (image, "not a table"), (fifo, "--csv")):
        r = _lgm("detect", "score", det, runs / "lgm" / "checkpoint.pt", "--data", "none", "--images", folder,
                 "--csv", target, "--no-progress")
        assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert mine.read_text() == "my own,table\n" and image.read_bytes() == before
    ours = tmp_path / "t.csv"
    for _ in range(2):  # its own table is replaced
        r = _lgm("detect", "score", det, runs / "lgm" / "checkpoint.pt", "--data", "none", "--images", folder,
                 "--csv", ours, "--no-progress")
        assert r.returncode == 0, r.stderr
    assert len(ours.read_text().splitlines()) == 3
