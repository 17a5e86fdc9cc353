"""Files you can trust (issue 42): outputs never replace a user's files or a run's, outputs are regular files,
a killed writer's temporaries are cleaned up, the cache removes and reports only what it can prove it wrote,
edited or unsigned files are refused, images are read as they are, and each failure is one line naming the
file.  CLI items run the real `lgm` command."""
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import fitted_detector, lgm_cli, one_line, tiny_run, write_idx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _module_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the module's runs stage into a cache of their own
        mp.setenv("LGM_DATA_DIR", str(tmp_path_factory.mktemp("module-cache")))
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        for name in ("LGM_SIGNING_KEY", "LGM_SIGNING_KEY_FILE"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=96, n_test=64)


@pytest.fixture(scope="module")
def run(src, tmp_path_factory):
    return tiny_run(src, tmp_path_factory)


@pytest.fixture(scope="module")
def detector(run, tmp_path_factory):
    return fitted_detector(run, tmp_path_factory)


_lgm = lgm_cli


_one_line = one_line


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- 3. a run's files are no output
@pytest.mark.parametrize("name", ["metrics.json", "config.json"])
def test_no_output_is_a_file_of_a_run_folder(run, detector, name):
    """`lgm eval CK --json runs/a/metrics.json` and `detect score ... --json runs/a/config.json` replaced the
    run's own files (exit 0)."""
    ck, target = run / "checkpoint.pt", run / name
    before = _digest(target)
    _one_line(_lgm("eval", ck, "--json", target, "--no-progress"), "run folder")
    _one_line(_lgm("detect", "score", detector, ck, "--json", target, "--no-progress"), "run folder")
    assert _digest(target) == before


def test_json_in_a_run_folder_replaces_only_a_commands_json(run, tmp_path):
    """A file of the user's (or a measurement cached) in a run folder stays; a command's own --json output
    there may be written again."""
    ck = run / "checkpoint.pt"
    notes = run / "notes.json"
    notes.write_text('{"mine": 1}')
    try:
        _one_line(_lgm("eval", ck, "--json", notes, "--no-progress"), "run folder")
        assert notes.read_text() == '{"mine": 1}'
        mine = run / "eval-mine.json"
        for _ in range(2):
            r = _lgm("eval", ck, "--json", mine, "--no-progress")
            assert r.returncode == 0, r.stderr
        assert json.loads(mine.read_text())["command"] == "eval"
    finally:
        notes.unlink(missing_ok=True)
        (run / "eval-mine.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- 7. outputs are regular files
def test_a_fifo_as_output_is_refused_at_once(run, tmp_path):
    """`mkfifo x.pt; lgm detect fit CK --out x.pt` and `lgm eval CK --json fifo.json` hung until killed."""
    ck = run / "checkpoint.pt"
    for name, args in (("x.pt", ("detect", "fit", ck, "--out")), ("fifo.json", ("eval", ck, "--json"))):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        t0 = time.monotonic()
        _one_line(_lgm(*args, fifo, "--no-progress", timeout=120), "named pipe")
        assert time.monotonic() - t0 < 60
        assert fifo.exists() and not fifo.is_file()  # left as it was


# ----------------------------------------------------------------------------- 9. a killed writer's temporaries
_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lgm_lab.run_folder import write_atomically

    def write(f):
        f.write(b"half a detector")
        f.flush()
        print("writing", flush=True)
        time.sleep(600)

    write_atomically(Path(sys.argv[1]), write)
""")


def _start_writer(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def test_a_killed_writers_temporary_is_removed_by_the_next_write(run, tmp_path):
    """`kill -9` during a detector write left `.prev.pt.XXXX.lgm-tmp` beside the output, and later writes never
    removed it; a live writer's temporary stays."""
    out = tmp_path / "prev.pt"
    killed = _start_writer(out)
    (stale,) = tmp_path.glob(".prev.pt.*.lgm-tmp")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = _start_writer(out)
    try:
        (held,) = set(tmp_path.glob(".prev.pt.*.lgm-tmp")) - {stale}
        mine = tmp_path / ".prev.pt.notes.lgm-tmp"  # not a name of ours (nor 8 characters): a user's file
        mine.write_text("mine")
        r = _lgm("detect", "fit", run / "checkpoint.pt", "--out", out, "--no-progress")
        assert r.returncode == 0, r.stderr
        assert not stale.exists() and held.exists() and mine.read_text() == "mine"
        assert out.is_file()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- 12. a failing write names its file
def _small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # writes beyond 64 bytes fail (EFBIG), as on a full disk


def test_a_failing_write_names_the_file(run, tmp_path):
    """A full disk said only `No space left on device`: which file could not be written?"""
    target = tmp_path / "eval.json"
    assert _lgm("eval", run / "checkpoint.pt", "--no-progress").returncode == 0  # the data staged into the cache
    err = _one_line(_lgm("eval", run / "checkpoint.pt", "--json", target, "--no-progress", preexec_fn=_small_files),
                    "File too large")
    assert str(target) in err and not target.exists() and not list(tmp_path.glob(".*.lgm-tmp"))


# ----------------------------------------------------------------------------- 1. ood's --out
_OOD = ("--eps", "0.1", "--no-adaptive", "--attack-subset", "8", "--fit-subset", "64", "--fpr", "0.05", "--no-progress")


def _png16(path: Path, value: int = 40000) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((28, 28), value, np.uint16)).save(path)


def _bomb(path: Path, side: int = 20000) -> None:
    """A PNG declaring side x side pixels (a decompression bomb's header, a few hundred bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_ood_never_replaces_a_users_files_in_its_out_folder(run, tmp_path):
    """`lgm ood CK --out d` replaced a user's own d/results.json and d/detection_roc.png (exit 0)."""
    ck, d = run / "checkpoint.pt", tmp_path / "d"
    d.mkdir()
    (d / "results.json").write_text('{"my": "results"}')
    (d / "detection_roc.png").write_bytes(b"my figure")
    _one_line(_lgm("ood", ck, "--out", d, *_OOD), "holds files", "--overwrite")
    _one_line(_lgm("ood", ck, "--out", d, "--overwrite", *_OOD), "not a file lgm ood wrote")
    assert (d / "results.json").read_text() == '{"my": "results"}' and (d / "detection_roc.png").read_bytes() == \
        b"my figure"
    # --overwrite replaces ood's own files only; a folder of images with one bomb: the others measured, it named
    (d / "results.json").unlink()
    (d / "notes.txt").write_text("mine")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png16(imgs / "a16.png")
    _bomb(imgs / "bomb.png")
    r = _lgm("ood", ck, "--out", d, "--overwrite", "--ood-data", imgs, *_OOD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped {imgs / 'bomb.png'}" in r.stderr and "decompression bomb" in r.stderr and "Traceback" not in \
        r.stderr
    res = json.loads((d / "results.json").read_text())
    assert res["command"] == "ood" and (d / "notes.txt").read_text() == "mine"
    assert (d / "detection_roc.png").read_bytes() != b"my figure"
    det = next(iter(res["results"].values()))["detectors"]
    assert all("imgs" in v["sets"] for v in det.values())
    # ... and again: its own results.json is replaced
    r = _lgm("ood", ck, "--out", d, "--overwrite", *_OOD)
    assert r.returncode == 0, r.stderr[-3000:]


# ----------------------------------------------------------------------------- 4, 6. images as they are
def test_detect_score_reads_images_by_bit_depth_and_names_a_bomb(run, detector, tmp_path):
    """A 16-bit grey PNG was clipped (99.5% of pixels 1.0); a 20000x20000 PNG was a traceback (exit 1)."""
    import numpy as np
    from PIL import Image

    ck = run / "checkpoint.pt"
    medians = {}
    for depth in (8, 16):
        folder = tmp_path / f"d{depth}"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            v = rng.integers(0, 256, (28, 28))
            Image.fromarray(v.astype(np.uint8) if depth == 8 else (v * 257).astype(np.uint16)).save(folder / f"{i}.png")
        if depth == 16:
            _bomb(folder / "z-bomb.png")
        r = _lgm("detect", "score", detector, ck, "--data", "noise", "--images", folder, "--json",
                 tmp_path / f"{depth}.json", "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads((tmp_path / f"{depth}.json").read_text())["results"][f"images in {folder}"]
        assert res["images"] == 4
        medians[depth] = res["score_median"]
    assert medians[16] == pytest.approx(medians[8], abs=1e-3)  # the same pictures, at 8 and at 16 bits
    assert f"skipped {tmp_path / 'd16' / 'z-bomb.png'}" in r.stderr and "decompression bomb" in r.stderr
    _one_line(_lgm("detect", "score", detector, ck, "--images", tmp_path / "d16" / "z-bomb.png", "--no-progress"),
              str(tmp_path / "d16" / "z-bomb.png"), "decompression bomb")


# ----------------------------------------------------------------------------- 6, 11. --ood-data
def test_ood_data_is_one_clear_line_naming_its_option(run, src, tmp_path):
    """`--ood-data ''` said `--images . holds no image`; `--ood-data runs/a` said `--images runs/a ...`; the model's
    own dataset was measured as abnormal; `--ood-data mnist` beside a ./mnist folder went to download MNIST; a bomb
    given alone was a traceback and left its empty --out folder."""
    ck, out = run / "checkpoint.pt", tmp_path / "o"
    work = tmp_path / "work"
    (work / "mnist").mkdir(parents=True)
    _bomb(tmp_path / "bomb.png")
    for spec, words in (("", ["--ood-data is empty"]), (str(run), ["--ood-data", "holds no image"]),
                        (f"fashion-mnist:{src}", ["the dataset", "was trained on"]),
                        (f"mnist:{src}", ["test images of fashion-mnist"]),
                        ("mnist", ["./mnist", "mnist:"]),
                        (str(tmp_path / "bomb.png"), [str(tmp_path / "bomb.png"), "decompression bomb"])):
        err = _one_line(_lgm("ood", ck, "--out", out, "--ood-data", spec, *_OOD, cwd=work), *words)
        assert "--images" not in err
        assert not out.exists()


# ----------------------------------------------------------------------------- 2, 8. the cache: only what it wrote
def _download(root: Path, folder: str = "MNIST") -> Path:
    """A download into the cache as torchvision makes one (files in ``folder``, an archive beside it), through
    the cache's own marking."""
    from lgm_lab.data_cache import marked_download

    root.mkdir(parents=True, exist_ok=True)
    with marked_download(root, folder, ("cifar-10-python.tar.gz",)):
        (root / folder / "raw").mkdir(parents=True)
        (root / folder / "raw" / "train-images-idx3-ubyte").write_bytes(b"\1" * 300_000)
        (root / "cifar-10-python.tar.gz").write_bytes(b"\2" * 100_000)
    return root / folder


def test_clear_never_removes_what_a_forged_or_copied_mark_names(tmp_path, monkeypatch):
    """A one-line `photos/.lgm-ext-download` holding {"files": ["thesis.pdf"]} made `lgm cache --clear` remove
    the user's thesis.pdf and photos/."""
    root = tmp_path / "data"
    monkeypatch.setenv("LGM_DATA_DIR", str(root))
    env = {"LGM_DATA_DIR": str(root)}
    mnist = _download(root)
    (root / "thesis.pdf").write_text("years of work")
    photos = root / "photos"
    photos.mkdir()
    (photos / "cat.png").write_text("a photo")
    (photos / ".lgm-ext-download").write_text('{"files": ["thesis.pdf"]}')  # forged
    copied = root / "copied"
    copied.mkdir()
    (copied / "raw").mkdir()
    (copied / "raw" / "train-images-idx3-ubyte").write_text("the user's own file of that name")
    (copied / ".lgm-ext-download").write_bytes((mnist / ".lgm-ext-download").read_bytes())  # copied
    r = _lgm("cache", env=env)
    assert r.returncode == 0 and f"{root}: 0.4 MiB" in r.stdout, r.stdout  # the download: 300 + 100 kB, no more
    r = _lgm("cache", "--clear", env=env)
    assert r.returncode == 0, r.stderr
    assert f"removed {mnist}" in r.stdout and f"removed {root / 'cifar-10-python.tar.gz'}" in r.stdout
    assert f"kept {photos}" in r.stdout and f"kept {copied}" in r.stdout and "thesis" not in r.stdout
    assert (root / "thesis.pdf").read_text() == "years of work" and (photos / "cat.png").read_text() == "a photo"
    assert (copied / "raw" / "train-images-idx3-ubyte").read_text() == "the user's own file of that name"
    assert not mnist.exists() and not (root / "cifar-10-python.tar.gz").exists()


def test_a_download_keeps_a_file_that_changed_or_was_added(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("LGM_DATA_DIR", str(root))
    mnist = _download(root)
    (mnist / "raw" / "my-notes.txt").write_text("mine")
    r = _lgm("cache", "--clear", env={"LGM_DATA_DIR": str(root)})
    assert r.returncode == 0 and f"kept {mnist}: holds files the download did not write" in r.stdout, r.stdout
    assert (mnist / "raw" / "my-notes.txt").read_text() == "mine"
    assert not (mnist / "raw" / "train-images-idx3-ubyte").exists()


def test_the_cache_reports_only_what_it_wrote(src, tmp_path):
    """`LGM_DATA_DIR=$HOME lgm cache` reported every file of the home folder as the cache (5,352.6 MiB) while
    --clear removed nothing there; `LGM_DATA_DIR=/` walked the whole filesystem."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "video.mp4").write_bytes(b"\0" * (3 << 20))
    env = {"LGM_DATA_DIR": str(home)}
    r = _lgm("cache", env=env)
    assert r.returncode == 0 and f"{home}: 0.0 MiB" in r.stdout, r.stdout
    r = _lgm("cache", env={"LGM_DATA_DIR": "/"}, timeout=120)
    assert r.returncode == 0 and "/: 0.0 MiB" in r.stdout and not r.stderr, (r.stdout, r.stderr[-2000:])


# ----------------------------------------------------------------------------- 5. edited files, signatures
def _edit(path: Path, change, to: Path) -> Path:
    """What anyone can do to a file without a key: edit its content and recompute its SHA-256."""
    import torch

    from lgm_lab.checkpoints import content_digest

    ck = torch.load(path, weights_only=True)
    ck.pop("sha256")
    change(ck)
    ck["sha256"] = content_digest(ck)
    torch.save(ck, to)
    return to


def test_a_checkpoint_with_nan_weights_is_refused_whatever_its_digest(run, tmp_path):
    """A checkpoint whose weights were set to NaN, its digest recomputed, evaluated (error 90.6%, exit 0)."""
    def nan(ck):
        name = next(k for k, v in ck["model"].items() if v.is_floating_point())
        ck["model"][name].fill_(float("nan"))

    bad = _edit(run / "checkpoint.pt", nan, tmp_path / "checkpoint.pt")
    _one_line(_lgm("eval", bad, "--no-progress"), "non-finite", str(bad))


def test_signed_files_are_checked_on_every_load(src, run, tmp_path):
    """With a key set, `lgm train` and `lgm detect fit` sign; a file edited and re-hashed by someone without the
    key, an unsigned file, or one signed with another key is refused, naming it."""
    key = {"LGM_SIGNING_KEY": "a key of mine, 32 bytes long...."}
    other = {"LGM_SIGNING_KEY": "someone else's key, 32 bytes...."}
    out = tmp_path / "signed"
    r = _lgm("train", "--out", out, "--epochs", "1", "--subset", "64", "--test-subset", "32", "--batch-size", "32",
             "--feat-dim", "2", "--data-dir", src, "--no-progress", env=key)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = out / "checkpoint.pt"
    det = tmp_path / "det.pt"
    assert _lgm("detect", "fit", ck, "--out", det, "--no-progress", env=key).returncode == 0
    r = _lgm("detect", "score", det, ck, "--data", "noise", "--no-progress", env=key)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _lgm("eval", ck, "--no-progress").returncode == 0  # without a key: the digest alone
    _one_line(_lgm("eval", ck, "--no-progress", env=other), str(ck), "signature does not match")
    _one_line(_lgm("eval", run / "checkpoint.pt", "--no-progress", env=key), "it is not signed")

    def moved(c):
        c["detector"]["means"] += 100.0

    edited = _edit(det, moved, tmp_path / "edited.pt")
    _one_line(_lgm("detect", "score", edited, ck, "--data", "noise", "--no-progress", env=key), str(edited),
              "signature does not match")
    _one_line(_lgm("eval", ck, "--no-progress", env={"LGM_SIGNING_KEY": "short"}), "at least 16")


# ----------------------------------------------------------------------------- 12. a refused pickle: our line
_PAYLOADS = textwrap.dedent("""
    import argparse, os, sys, torch

    class Run:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "lgm-ext-checkpoint-v3", "x": Run()}, sys.argv[1])
    torch.save({"format": "lgm-ext-checkpoint-v3", "x": argparse.Namespace(a=1)}, sys.argv[2])
""")


def test_a_refused_pickle_is_one_line_of_ours(run, detector, tmp_path):
    """A refused pickle payload printed torch's text cut at 200 characters, with raw ANSI codes and half of its
    "weights_only=False" advice, which a user must not follow here."""
    evil, other = tmp_path / "evil.pt", tmp_path / "namespace.pt"
    subprocess.run([sys.executable, "-c", _PAYLOADS, str(evil), str(other)], check=True)
    for path, name in ((evil, "posix.system"), (other, "argparse.Namespace")):
        for args in (("eval", path), ("detect", "score", path, run / "checkpoint.pt"),
                     ("detect", "score", detector, path)):
            err = _one_line(_lgm(*args, "--no-progress"), str(path), name)
            assert "\x1b" not in err and "weights_only" not in err, err
            assert "pwned" not in err


# ----------------------------------------------------------------------------- 10. bounds no network can meet
@pytest.mark.parametrize("c", ["1e-300", "1e-45"])
def test_a_spectral_norm_no_network_can_meet_is_refused_naming_the_range(src, tmp_path, c):
    """`--spectral-norm 1e-300` failed later as a "non-finite gradient ... try a lower --lr"; `1e-45` trained to
    chance (90.6% error)."""
    out = tmp_path / "run"
    _one_line(_lgm("train", "--out", out, "--epochs", "1", "--subset", "64", "--data-dir", src, "--spectral-norm", c,
                   "--no-progress"), "spectral_norm must be 0 (off) or in [0.093, 3.4e+38] for lenetpp")
    assert not out.exists()
