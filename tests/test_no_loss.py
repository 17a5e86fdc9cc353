"""Nothing a user owns is deleted or overwritten (issue 32): no command writes over its own inputs, the data
cache removes only what it wrote, a finished run is never deleted, a folder of the user's files is not taken
for a run, garbage files are one line, and refused commands leave nothing behind.  CLI items run the real
`lgm` command; races run real processes."""
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import fitted_detector, lgm_cli, one_line, tiny_config, tiny_run, write_idx

from lgm_lab.checkpoints import CheckpointError
from lgm_lab.run_folder import LOCK_NAME, RunFolderBusy, locked
from lgm_lab.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _module_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the module's runs stage into a cache of their own
        mp.setenv("LGM_DATA_DIR", str(tmp_path_factory.mktemp("module-cache")))
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # the default cache, should a test reach it
        yield


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=96, n_test=64)


_tiny = tiny_config


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


# ----------------------------------------------------------------------------- 1. outputs vs inputs
def test_detect_fit_never_writes_over_its_checkpoint(run, tmp_path):
    ck = run / "checkpoint.pt"
    before = _digest(ck)
    alias = tmp_path / "alias.pt"
    alias.symlink_to(ck)
    for target in (ck, run / ".." / run.name / "checkpoint.pt", alias):
        _one_line(_lgm("detect", "fit", ck, "--out", target, "--no-progress"), "own input")
    assert _digest(ck) == before
    other = tmp_path / "notes.pt"
    other.write_text("a user's file")
    _one_line(_lgm("detect", "fit", ck, "--out", other, "--no-progress"), "not a detector file")
    assert other.read_text() == "a user's file"


@pytest.mark.parametrize("which", ["checkpoint", "detector"])
def test_detect_score_never_writes_its_json_over_an_input(run, detector, which):
    target = run / "checkpoint.pt" if which == "checkpoint" else detector
    before = _digest(target)
    _one_line(_lgm("detect", "score", detector, run / "checkpoint.pt", "--json", target, "--no-progress"),
              "own input")
    assert _digest(target) == before


def test_json_never_replaces_a_file_that_is_not_json(run, tmp_path):
    """--json of `ood` (and every command) named a checkpoint: replaced by JSON."""
    ck = run / "checkpoint.pt"
    before = _digest(ck)
    _one_line(_lgm("ood", ck, "--out", tmp_path / "o", "--json", ck, "--no-progress"), "own input")
    assert _digest(ck) == before and not (tmp_path / "o").exists()
    mine = tmp_path / "report.txt"
    mine.write_text("not json")
    _one_line(_lgm("eval", ck, "--json", mine, "--no-progress"), "not a JSON file")
    assert mine.read_text() == "not json"


def test_detect_fit_takes_the_folders_lock(run, tmp_path):
    """A detector written into a run folder while `lgm train` writes it is refused, naming the holder."""
    with locked(tmp_path):
        _one_line(_lgm("detect", "fit", run / "checkpoint.pt", "--out", tmp_path / "det.pt", "--no-progress"),
                  "in use")
    assert not (tmp_path / "det.pt").exists()


# ----------------------------------------------------------------------------- 2, 3, 11. the cache
def test_an_empty_cache_variable_means_the_default_and_never_the_working_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    (work / "data").mkdir()
    env = {"LGM_DATA_DIR": "", "HOME": str(tmp_path / "home")}
    r = _lgm("cache", cwd=work, env=env)
    assert r.returncode == 0 and str(tmp_path / "home" / ".cache" / "lgm-ext" / "data") in r.stdout, r.stdout
    r = _lgm("cache", "--clear", cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert (work / "thesis.tex").read_text() == "years of work" and (work / "data").is_dir()


def test_clear_removes_only_what_the_cache_wrote(src, tmp_path, monkeypatch):
    from lgm_lab.data import load_dataset

    mine = tmp_path / "mine"
    (mine / "FashionMNIST" / "raw").mkdir(parents=True)  # the user's own copy, in torchvision's layout
    (mine / "FashionMNIST" / "raw" / "notes.txt").write_text("mine")
    (mine / "results.csv").write_text("1,2")
    env = {"LGM_DATA_DIR": str(mine)}
    r = _lgm("cache", "--clear", env=env)
    assert r.returncode == 0 and "nothing removed" in r.stdout and "removed " not in r.stdout, r.stdout
    monkeypatch.setenv("LGM_DATA_DIR", str(mine))
    load_dataset("fashion-mnist", True, data_dir=src)  # stages a copy into the user's folder
    staged = list((mine / "staged").glob("*/*"))
    assert len(staged) == 1
    r = _lgm("cache", "--clear", env=env)
    assert r.returncode == 0 and f"removed {staged[0]}" in r.stdout, r.stdout
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "FashionMNIST", "FashionMNIST/raw", "FashionMNIST/raw/notes.txt", "results.csv"]


def test_clear_of_a_missing_or_file_cache_says_so(tmp_path):
    r = _lgm("cache", "--clear", env={"LGM_DATA_DIR": str(tmp_path / "missing")})
    assert r.returncode == 0 and "does not exist: nothing to remove" in r.stdout and "removed " not in r.stdout
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(_lgm("cache", "--clear", env={"LGM_DATA_DIR": str(f)}), "not a folder")
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------- 10. pruning vs a copy in use
_LOADER = textwrap.dedent("""
    import random, sys
    from lgm_lab.data import load_dataset
    sources, n, seed = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    failed = 0
    for _ in range(n):
        try:
            ds = load_dataset("fashion-mnist", True, data_dir=rng.choice(sources), download=False)
            assert len(ds) == 40
        except Exception as err:
            failed += 1
            print(type(err).__name__, err, file=sys.stderr)
    print(failed)
""")


def test_pruning_never_removes_a_copy_in_use(tmp_path):
    """With more than three sources staged at once, pruning deleted another process's copy while it read it
    (4 of 200 loads failed with 5 processes)."""
    sources = [str(write_idx(tmp_path / f"s{i}", n_train=40, n_test=8, seed=i)) for i in range(5)]
    procs = [subprocess.Popen([sys.executable, "-c", _LOADER, ",".join(sources), "40", str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(5)]
    outs = [p.communicate(timeout=600) for p in procs]
    failed = sum(int(o.strip().splitlines()[-1]) for o, _ in outs)
    assert failed == 0, "\n".join(e[-1000:] for _, e in outs)
    staged = [c for c in (tmp_path / "cache" / "staged").glob("*/*") if not c.name.startswith(".")]
    assert len(staged) <= 3 + 5  # bounded: the kept ones, and any in use at the last prune


def test_a_removal_never_skips_the_lock(tmp_path, monkeypatch):
    """CI saw one load of 200 fail in the race above: a pruner that did not see the copy's mark yet renamed the
    copy away without taking the lock, while a reader created the mark and locked it.  Deterministically: the
    mark appears (and is locked by a reader) just after the pruner would have looked for it."""
    import fcntl
    import os
    from pathlib import Path

    from lgm_lab import data as D
    from lgm_lab import data_cache as C

    copy = tmp_path / "staged" / "src" / "0123456789abcdef"
    (copy / "FashionMNIST" / "raw").mkdir(parents=True)
    fd = os.open(copy / D.STAGED_MARK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a reader is using the copy
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda p: False if p.name == D.STAGED_MARK else real_is_file(p))
    try:
        assert C.remove_copy(copy) is False and (copy / "FashionMNIST" / "raw").is_dir()
        C.drop_copy(copy)  # nor does dropping a copy this process could not read remove it from under a reader
        assert (copy / "FashionMNIST" / "raw").is_dir()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert C.remove_copy(copy) is True and not copy.exists()  # free: removed
    assert C.remove_copy(copy) is False  # gone: nothing to remove


# ----------------------------------------------------------------------------- 4, 12. reuse
def test_a_finished_run_is_reused_whatever_the_spelling_of_its_data_folder(src, tmp_path):
    """`lgm budget` (the shared train-or-reuse path) rmtree'd a finished run because --data-dir named the same
    files by another path, then retrained."""
    from lgm_lab.experiments.runs import train_or_reuse

    out = tmp_path / "point"
    assert train_or_reuse(_tiny(src), out, print) is False
    before = _digest(out / "checkpoint.pt")
    link = tmp_path / "same-files"
    link.symlink_to(src)
    copy = tmp_path / "a-copy"
    copy.mkdir()
    for f in Path(src).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    for spelling in (link, copy, Path(str(src) + "/")):
        assert train_or_reuse(_tiny(src, data_dir=str(spelling)), out, print) is True
    assert _digest(out / "checkpoint.pt") == before


def test_a_finished_run_that_does_not_match_is_refused_and_kept(src, tmp_path):
    from lgm_lab.experiments.runs import train_or_reuse

    out = tmp_path / "point"
    train_or_reuse(_tiny(src), out, print)
    files = {p.name: _digest(p) for p in out.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"lr.*kept"):
        train_or_reuse(_tiny(src, lr=0.5), out, print)
    other = write_idx(tmp_path / "other", n_train=96, n_test=64, seed=7)
    with pytest.raises(CheckpointError, match=r"data differ.*kept"):
        train_or_reuse(_tiny(src, data_dir=str(other)), out, print)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])  # damaged
    files["checkpoint.pt"] = _digest(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="kept"):
        train_or_reuse(_tiny(src), out, print)
    assert {p.name: _digest(p) for p in out.iterdir() if p.is_file()} == files


_HOLD = textwrap.dedent("""
    import sys, time
    from lgm_lab.run_folder import locked
    with locked(sys.argv[1], shared=sys.argv[2] == "shared"):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
""")


def test_readers_of_a_finished_run_share_it_and_a_writer_excludes_them(src, tmp_path):
    """Two `lgm budget` on one --out whose points are all finished: the second was refused as "in use"."""
    from lgm_lab.experiments.runs import train_or_reuse

    out = tmp_path / "point"
    train_or_reuse(_tiny(src), out, print)
    for mode, busy in (("shared", False), ("exclusive", True)):
        p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), mode, "30"], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "held"
            if busy:
                with pytest.raises(RunFolderBusy, match="in use|written"):
                    train_or_reuse(_tiny(src), out, print)
            else:
                assert train_or_reuse(_tiny(src), out, print) is True
        finally:
            p.kill()
            p.wait()


def test_the_lock_file_goes_with_its_last_holder(tmp_path):
    with locked(tmp_path, shared=True):
        with locked(tmp_path, shared=True):
            with pytest.raises(RunFolderBusy):
                with locked(tmp_path):
                    pass
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # a killed holder's file, not locked
    os.close(fd)
    with locked(tmp_path):
        pass
    assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- 5, 6. lgm train's folder
def test_train_refuses_a_folder_of_the_users_files(src, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"experiment": "mine"}')
    (out / "metrics.csv").write_text("a,b\n1,2\n")
    (out / "checkpoint.pt.tmp").write_text("keep")
    args = ("train", "--out", out, "--data-dir", src, "--subset", 64, "--test-subset", 32, "--batch-size", 32,
            "--epochs", 1, "--feat-dim", 2, "--no-progress")
    _one_line(_lgm(*args), "did not write", "--overwrite")
    assert (out / "config.json").read_text() == '{"experiment": "mine"}'
    assert (out / "metrics.csv").read_text() == "a,b\n1,2\n" and (out / "checkpoint.pt.tmp").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt.tmp", "config.json", "metrics.csv"]
    r = _lgm(*args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "checkpoint.pt.tmp").read_text() == "keep"  # --overwrite replaces the run's files only


@pytest.mark.parametrize("folder", ["missing/typo", "empty", "not-a-run"])
def test_resume_with_nothing_to_resume_is_refused(tmp_path, folder):
    out = tmp_path / folder
    if folder != "missing/typo":
        out.mkdir()
    if folder == "not-a-run":
        (out / "config.json").write_text('{"learning": "notes"}')
    msg = "not the config.json of an lgm-ext run" if folder == "not-a-run" else "nothing to resume"
    _one_line(_lgm("train", "--out", out, "--resume", "--no-progress"), msg)
    assert not (tmp_path / "missing").exists()
    if folder == "empty":
        assert list(out.iterdir()) == []
    if folder == "not-a-run":
        assert (out / "config.json").read_text() == '{"learning": "notes"}' and len(list(out.iterdir())) == 1


def test_a_refused_run_leaves_nothing_behind(src, tmp_path):
    out = tmp_path / "new" / "run"
    _one_line(_lgm("train", "--out", out, "--data-dir", src, "--subset", 64, "--batch-size", 32, "--head", "lgm",
                   "--steps", 2, "--warmup-steps", 5, "--no-progress"), "warm-up")
    assert not (tmp_path / "new").exists()


def test_resuming_a_step_run_with_epochs_says_they_are_ignored(src, tmp_path):
    out = tmp_path / "run"
    train(_tiny(src, steps=2, epochs=1, warmup_steps=1), out, progress=False)
    r = _lgm("train", "--out", out, "--resume", "--epochs", 9, "--no-progress")
    assert r.returncode == 0 and "--epochs 9 is ignored" in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- 7, 8. damaged and crafted files
def test_detector_files_carry_a_digest_and_fit_only_their_model(run, detector, tmp_path, src):
    from lgm_lab.detector_file import load_detector_file

    det, info = load_detector_file(detector)
    assert det.threshold is not None and info["checkpoint"] == str(run / "checkpoint.pt")
    original = det.state_dict()
    blob = bytearray(detector.read_bytes())
    refused = []
    for i in range(0, len(blob), max(1, len(blob) // 200)):  # ~200 single-bit flips over the whole file
        bad = tmp_path / f"flip{i}.pt"
        blob[i] ^= 0x10
        bad.write_bytes(bytes(blob))
        blob[i] ^= 0x10
        try:
            loaded, _ = load_detector_file(bad)
        except ValueError:
            refused.append(bad)
            continue
        # a flip that loads changed nothing the detector holds (zip metadata): never altered means or threshold
        got = loaded.state_dict()
        assert got.keys() == original.keys() and all(
            torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v for k, v in original.items())
    assert len(refused) > 20
    for bad in refused[:: max(1, len(refused) // 3)][:3]:
        _one_line(_lgm("detect", "score", bad, run / "checkpoint.pt", "--no-progress"))
    # edited (a threshold of -inf) without the digest: refused
    file = torch.load(detector, weights_only=True)
    file["detector"]["threshold"] = float("-inf")
    torch.save(file, tmp_path / "edited.pt")
    _one_line(_lgm("detect", "score", tmp_path / "edited.pt", run / "checkpoint.pt", "--no-progress"), "SHA-256")
    # another model's (3 classes) detector: refused before any work
    three = tmp_path / "three"
    train(_tiny(src, classes="0-2", feat_dim=3), three, progress=False)
    det3 = tmp_path / "det3.pt"
    assert _lgm("detect", "fit", three / "checkpoint.pt", "--out", det3, "--no-progress").returncode == 0
    _one_line(_lgm("detect", "score", det3, run / "checkpoint.pt", "--no-progress"), "3 classes")


@pytest.mark.parametrize("damage", ["text", "flip"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_everywhere(run, detector, tmp_path, damage):
    bad = tmp_path / "t.pt"
    if damage == "text":
        bad.write_text("test file\n")
    else:
        blob = bytearray((run / "checkpoint.pt").read_bytes())
        blob[len(blob) // 2] ^= 0x01
        bad.write_bytes(bytes(blob))
    resume = tmp_path / "resume"
    resume.mkdir()
    (resume / "checkpoint.pt").write_bytes(bad.read_bytes())
    for args in (("eval", bad), ("detect", "fit", bad, "--out", tmp_path / "d.pt"), ("detect", "score", detector, bad),
                 ("detect", "score", bad, run / "checkpoint.pt"), ("ood", bad, "--out", tmp_path / "o"),
                 ("train", "--out", resume, "--resume")):
        _one_line(_lgm(*args, "--no-progress"), str(bad.name if args[0] != "train" else "checkpoint.pt"))
    assert not (tmp_path / "o").exists() and not (tmp_path / "d.pt").exists()


def test_crafted_detector_files_are_one_line(run, detector, tmp_path):
    from lgm_lab.checkpoints import content_digest

    good = torch.load(detector, weights_only=True)

    def craft(edit):
        f = {k: v for k, v in good.items() if k != "sha256"}
        f["detector"] = dict(f["detector"])
        edit(f)
        f["sha256"] = content_digest(f)
        path = tmp_path / "crafted.pt"
        torch.save(f, path)
        return path

    for edit, word in ((lambda f: f.pop("checkpoint_sha256"), "lacks 'checkpoint_sha256'"),
                       (lambda f: f["detector"].pop("means"), "means"),
                       (lambda f: f.update(fpr="abc"), "'fpr'"),
                       (lambda f: f.update(fpr=7.0), "fpr 7.0"),
                       (lambda f: f["detector"].update(means=f["detector"]["means"][:, :1]), ""),
                       (lambda f: f.update(num_classes=3), "")):
        _one_line(_lgm("detect", "score", craft(edit), run / "checkpoint.pt", "--no-progress"), word)


# ----------------------------------------------------------------------------- 9. figure writes
def test_a_failing_figure_write_of_ood_is_one_line(run, tmp_path):
    """The figure write of `lgm ood` was outside the error handling (a read-only folder, a full disk):
    reproduced with a folder where the figure's file should be."""
    out = tmp_path / "o"
    (out / "detection_roc.png").mkdir(parents=True)
    _one_line(_lgm("ood", run / "checkpoint.pt", "--out", out, "--subset", 32, "--fit-subset", 64,
                   "--attack-subset", 4, "--eps", "0.1", "--no-adaptive", "--no-progress"), "detection_roc")


# ----------------------------------------------------------------------------- clear messages
@pytest.mark.parametrize("args, word", [
    (("budget", "--at", "128:-1", "--seeds", "0"), "128:-1"),
    (("budget", "--seeds", ""), "--seeds"),
    (("ablation", "--seeds", ""), "--seeds"),
    (("ablation", "--seeds", "-1"), "[0, 4294967295]"),
    (("budget", "--seeds", "99999999999999999999"), "[0, 4294967295]"),
    (("train", "--seed", "99999999999999999999"), "[0, 4294967295]"),
    (("train", "--seed", "-1"), "[0, 4294967295]"),
    (("train", "--momentum", "2"), "momentum"),
    (("train", "--head", "lsoftmax", "--lsoftmax-m", "100"), "lsoftmax_m"),
])
def test_bad_options_are_one_clear_line_and_leave_nothing(tmp_path, args, word):
    out = tmp_path / "new"
    msg = _one_line(_lgm(*args, "--out", out))
    assert word in msg
    assert not out.exists()


def test_subset_of_one_is_a_clear_error(run, detector):
    _one_line(_lgm("detect", "score", detector, run / "checkpoint.pt", "--subset", 1, "--no-progress"),
              "too few test images")


def test_center_loss_takes_any_integer_labels():
    from lgm_ext import CenterLoss

    torch.manual_seed(0)
    x = torch.randn(6, 2)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    a, b = CenterLoss(3, 2, auto_update=False), CenterLoss(3, 2, auto_update=False)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(a(x, y.to(dtype)), b(x, y))


def test_the_lock_is_not_left_by_a_finished_detect_fit(run, detector):
    assert not (detector.parent / LOCK_NAME).exists()


def test_no_lock_left_in_a_trained_run(run):
    assert not (run / LOCK_NAME).exists()


def test_a_staged_copy_in_use_is_kept_by_clear(src, tmp_path):
    from lgm_lab.data import STAGED_MARK, clear_cache, load_dataset

    load_dataset("fashion-mnist", True, data_dir=src)
    copy = next(c for c in (tmp_path / "cache" / "staged").glob("*/*"))
    fd = os.open(copy / STAGED_MARK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # another process reading it
    try:
        done = clear_cache()
        assert done.kept == [copy] and copy.is_dir()
    finally:
        os.close(fd)
    assert clear_cache().removed and not copy.exists()
    time.sleep(0)


def test_json_written_by_a_command_is_replaced(tmp_path, run):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"old": 1}))
    r = _lgm("eval", run / "checkpoint.pt", "--json", out, "--subset", 16, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())["command"] == "eval"


def test_make_test_sanitize_never_clears_a_folder_it_did_not_make(tmp_path):
    """`make test-sanitize` replaces the Python packages of its own copy (SANITIZE_DIR/src); a SANITIZE_DIR whose
    src/ it did not make (no marker) is refused before anything there is removed or overwritten."""
    mine = tmp_path / "src" / "lgm_lab" / "mine.py"
    mine.parent.mkdir(parents=True)
    mine.write_text("a user's file\n")
    r = subprocess.run(["make", "-s", "test-sanitize", f"SANITIZE_DIR={tmp_path}", f"PYTHON={sys.executable}"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "is not a copy that make test-sanitize made" in r.stderr
    assert mine.read_text() == "a user's file\n" and sorted(p.name for p in (tmp_path / "src").iterdir()) == ["lgm_lab"]
