"""A run folder has one writer, loses nothing that is not the project's, refuses a resume on other data,
and fails with one line when the disk does (issue 22, items 6, 7, 8, 15, 16)."""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import write_idx

from lgm_lab.checkpoints import CheckpointError, load_checkpoint
from lgm_lab.config import config_from_preset
from lgm_lab.run_folder import RunFolderBusy, locked, write_atomically
from lgm_lab.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=96, n_test=64)


def _tiny(src, **kw):
    base = dict(epochs=1, subset=64, test_subset=32, batch_size=32, feat_dim=2, head="softmax", data_dir=str(src))
    base.update(kw)
    return config_from_preset(None, **base)


def _lgm(*args, cwd=None, env=None, preexec=None):
    return subprocess.run([sys.executable, "-m", "lgm_cli.app", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, preexec_fn=preexec)


def test_a_second_writer_is_refused_naming_the_holder(src, tmp_path):
    """Two `lgm train --out D` at once: the second exits 2 with one line naming the first (pid); before, both
    ran, shared the `.tmp` names, and one died at random or the folder kept only the later run."""
    out = tmp_path / "run"
    out.mkdir()
    ready, release = threading.Event(), threading.Event()

    def hold():
        with locked(out):
            ready.set()
            release.wait()  # until the second writer has been refused (the finally below sets it)

    t = threading.Thread(target=hold)
    t.start()
    ready.wait(10)
    try:
        # another process: flock locks belong to open files, so a second process is refused
        r = _lgm("train", "--out", out, "--subset", 64, "--test-subset", 32, "--batch-size", 32, "--epochs", 1,
                 "--data-dir", src, "--no-progress", env={**os.environ, "LGM_DATA_DIR": str(tmp_path / "c")})
    finally:
        release.set()
        t.join()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "in use by another run" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert not (out / "checkpoint.pt").exists()
    with locked(out):  # released: the next writer gets it
        pass


def test_the_lock_is_exclusive_between_processes(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom lgm_lab.run_folder import locked\n"
            "with locked(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {p.pid}"):
            with locked(tmp_path):
                pass
    finally:
        p.kill()
        p.wait()
    with locked(tmp_path):  # a killed holder leaves no stale lock
        pass


def test_only_the_projects_temporaries_are_removed(src, tmp_path):
    """`lgm train` used to delete every `*.tmp` in --out (a user's notes.tmp, and with `--out .` every
    `*.tmp` of the working directory)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.tmp").write_text("mine")
    (out / "draft.json.tmp").write_text("mine too")
    (out / ".checkpoint.pt.abcd1234.lgm-tmp").write_bytes(b"half a checkpoint")  # a killed writer's
    (out / "metrics.json.tmp").write_text("[]")  # lgm-ext 0.2's name for the same: a user's file may have it
    with pytest.raises(CheckpointError, match="did not write"):  # a folder of the user's files is no run's
        train(_tiny(src), out, progress=False)
    train(_tiny(src), out, progress=False, overwrite=True)
    assert (out / "notes.tmp").read_text() == "mine" and (out / "draft.json.tmp").read_text() == "mine too"
    assert (out / "metrics.json.tmp").read_text() == "[]"
    assert not (out / ".checkpoint.pt.abcd1234.lgm-tmp").exists()
    assert not list(out.glob("*.lgm-tmp")) and not list(out.glob(".*.lgm-tmp"))


def test_atomic_writes_use_their_own_temporaries_and_replace_links(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "results.json").symlink_to(outside)
    write_atomically(folder / "results.json", lambda f: f.write(b"{}"))
    assert outside.read_text() == "keep" and not (folder / "results.json").is_symlink()
    assert (folder / "results.json").read_text() == "{}"
    seen = []

    def write(f):
        nonlocal seen
        seen = seen + [p.name for p in folder.iterdir() if p.name.endswith(".lgm-tmp")]
        f.write(b"x")

    write_atomically(folder / "a.bin", write)
    write_atomically(folder / "a.bin", write)
    assert seen[0] != seen[1] and all(n.startswith(".a.bin.") and n.endswith(".lgm-tmp") for n in seen)


def test_resume_on_changed_data_is_refused(tmp_path):
    """After the files under --data-dir change, `--resume` trained epoch 1 on the old data and epochs 2-3 on
    the new, and exited 0.  The checkpoint now holds a content hash of the data; a resume on other data stops."""
    data = write_idx(tmp_path / "data", n_train=96, n_test=64)
    cfg = _tiny(data, epochs=3)
    train(cfg, tmp_path / "run", progress=False, stop_after=1)
    assert set(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["data"]) == {"train", "test"}
    write_idx(data, n_train=96, n_test=64, seed=7)  # replaced in place
    with pytest.raises(CheckpointError, match="train and test data differ"):
        train(cfg, tmp_path / "run", progress=False, resume=True)
    write_idx(data, n_train=96, n_test=64, seed=0)  # the original files again: the resume goes on
    assert train(cfg, tmp_path / "run", progress=False, resume=True).epochs_done == 3


def test_the_data_dir_is_saved_resolved(src, tmp_path, monkeypatch):
    monkeypatch.chdir(src.parent)
    cfg = _tiny(Path(os.path.relpath(src, src.parent)))
    train(cfg, tmp_path / "run", progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["data_dir"]
    assert saved == str(src.resolve())
    monkeypatch.chdir(tmp_path)  # a resume from elsewhere finds the same folder
    assert train(_tiny(src, epochs=1), tmp_path / "run", progress=False, resume=True).epochs_done == 1


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_failing_checkpoint_write_is_one_line(src, tmp_path):
    """A full disk during the checkpoint write ended in a 115-line traceback (torch.save raises from C++).
    Reproduced with a file-size limit: the checkpoint (~3 MB) cannot be written, everything before it can."""
    out = tmp_path / "run"
    r = _lgm("train", "--out", out, "--subset", 64, "--test-subset", 32, "--batch-size", 32, "--epochs", 1,
             "--data-dir", src, "--no-progress", preexec=_limit_file_size(1 << 20),
             env={**os.environ, "LGM_DATA_DIR": str(tmp_path / "c")})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "File too large" in r.stderr
    assert not (out / "checkpoint.pt").exists() and not list(out.glob(".*.lgm-tmp"))


def test_verify_writes_only_into_its_folder(src, tmp_path):
    """`verify --out D` wrote through a symbolic link D/results.json to a file outside D."""
    run = tmp_path / "run"
    train(_tiny(src, head="lgm"), run, progress=False)
    out = tmp_path / "verify"
    out.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    (out / "results.json").symlink_to(outside)
    (out / "roc.png").symlink_to(tmp_path / "outside.png")
    r = _lgm("verify", run / "checkpoint.pt", "--out", out, "--subset", 16, "--no-progress",
             env={**os.environ, "LGM_DATA_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert outside.read_text() == "keep" and not (tmp_path / "outside.png").exists()
    assert json.loads((out / "results.json").read_text())["command"] == "verify"
    assert not (out / "results.json").is_symlink() and not (out / "roc.png").is_symlink()


def test_a_waiting_lock_takes_no_time(tmp_path):
    t0 = time.perf_counter()
    with locked(tmp_path):
        with pytest.raises(RunFolderBusy):
            with locked(tmp_path):
                pass
    assert time.perf_counter() - t0 < 5  # refused at once, never a hang


def test_in_folder_names_a_reports_file_relative_to_it(tmp_path, monkeypatch):
    from lgm_lab.run_folder import in_folder
    assert in_folder(tmp_path / "figures" / "a.png", tmp_path) == "figures/a.png"
    monkeypatch.chdir(tmp_path)  # a relative report folder and an absolute file path in it
    assert in_folder(tmp_path / "out" / "figures" / "a.png", "out") == "figures/a.png"
    assert in_folder("/elsewhere/a.png", tmp_path) == "/elsewhere/a.png"  # outside: as given


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """A report or checkpoint written atomically is readable as any file its user writes (0o666 less the
    umask), not private like the temporary it was written through (0o600 before); a file it replaces keeps
    its mode."""
    import os
    import stat

    from lgm_lab.run_folder import save_text
    old = os.umask(0o022)
    try:
        save_text(tmp_path / "report.md", "x")
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
        os.umask(0o027)
        save_text(tmp_path / "other.md", "x")
        assert stat.S_IMODE((tmp_path / "other.md").stat().st_mode) == 0o640
        (tmp_path / "report.md").chmod(0o600)  # the user's choice for an existing file is kept
        save_text(tmp_path / "report.md", "y")
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o600
        assert (tmp_path / "report.md").read_text() == "y"
        assert os.umask(0o027) == 0o027  # the umask is the caller's, untouched
        (tmp_path / "target.md").write_text("t")  # a link is replaced by a new file; its target keeps its mode
        (tmp_path / "target.md").chmod(0o600)
        (tmp_path / "link.md").symlink_to(tmp_path / "target.md")
        save_text(tmp_path / "link.md", "z")
        assert not (tmp_path / "link.md").is_symlink() and (tmp_path / "target.md").read_text() == "t"
        assert stat.S_IMODE((tmp_path / "link.md").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "target.md").stat().st_mode) == 0o600
        assert not list(tmp_path.glob(".*.lgm-tmp"))
    finally:
        os.umask(old)
