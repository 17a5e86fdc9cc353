"""Datasets staged from folders: concurrent staging, wrong image sizes, a named folder is only read, the
cache is bounded and can be cleared (issue 22, items 9, 15, 16)."""
import gzip
import multiprocessing as mp
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_idx

from lgm_lab import data as D


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))


def _stage(src: str, cache: str, queue) -> None:
    import os

    os.environ["LGM_DATA_DIR"] = cache
    try:
        from lgm_lab.data import load_dataset

        queue.put(len(load_dataset("fashion-mnist", True, data_dir=src, download=False)))
    except Exception as err:  # reported to the parent
        queue.put(f"{type(err).__name__}: {err}")


def test_two_runs_stage_one_folder_at_once(tmp_path):
    """First-time staging of one --data-dir by two runs at once raced on shared `raw/*.tmp` names (2 of 4
    tries failed).  Each writer now has its own temporaries and renames them into place."""
    src = write_idx(tmp_path / "src", n_train=3000, n_test=10)  # big enough for the copies to overlap
    ctx = mp.get_context("spawn")
    for attempt in range(3):
        cache = tmp_path / f"cache{attempt}"
        q = ctx.Queue()
        procs = [ctx.Process(target=_stage, args=(str(src), str(cache), q)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(60)
        assert results == [3000] * 4, results
        assert not list(cache.rglob("*.lgm-tmp")) and not list(cache.rglob("*.tmp"))


def _write_images(path: Path, n: int, side: int) -> None:
    x = torch.zeros(n, side, side, dtype=torch.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, side, side) + x.numpy().tobytes())


def test_images_of_the_wrong_size_are_one_clear_error(tmp_path):
    """32x32 images in an MNIST-format folder ended in a 153-line traceback at the first forward."""
    src = write_idx(tmp_path / "src", n_train=20, n_test=10)
    _write_images(src / "train-images-idx3-ubyte.gz", 20, 32)
    with pytest.raises(D.DatasetUnavailable, match="images .* are 32x32, expected 28x28"):
        D.load_dataset("fashion-mnist", True, data_dir=src, download=False)
    r = subprocess.run([sys.executable, "-m", "lgm_cli.app", "train", "--out", str(tmp_path / "run"),
                        "--data-dir", str(src), "--epochs", "1", "--no-progress"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "LGM_DATA_DIR": str(tmp_path / "c")})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "32x32" in r.stderr, r.stderr[-2000:]


def test_a_named_data_dir_is_never_written_to(tmp_path):
    """A checkpoint's saved data_dir made `lgm eval` create `<data_dir>/FashionMNIST/raw` and try a
    download there."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("fashion-mnist", "mnist", "cifar10"):
        with pytest.raises(D.DatasetUnavailable):
            D.load_dataset(name, False, data_dir=empty)  # download=True by default: still never into empty/
    assert list(empty.iterdir()) == []


def test_the_staging_cache_is_bounded_and_drops_bad_copies(tmp_path):
    """The staging cache kept a full copy per source ever staged, invalid ones included."""
    sources = [write_idx(tmp_path / f"src{i}", n_train=20, n_test=10, seed=i) for i in range(D.STAGED_KEEP + 2)]
    for s in sources:
        D.load_dataset("fashion-mnist", True, data_dir=s, download=False)
    staged = [c for c in (D.default_data_dir() / "staged").glob("*/*") if c.is_dir()]
    assert len(staged) == D.STAGED_KEEP
    bad = write_idx(tmp_path / "bad", n_train=20, n_test=10)
    blob = (bad / "train-images-idx3-ubyte.gz").read_bytes()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(D.DatasetUnavailable, match="truncated"):
        D.load_dataset("fashion-mnist", True, data_dir=bad, download=False)
    key = str(bad.resolve()).replace("/", "_").strip("_")
    assert not any(key in str(c) for c in (D.default_data_dir() / "staged").glob("*/*"))
    assert D.cache_size() > 0
    assert D.clear_cache().freed > 0 and not D.default_data_dir().exists()
    assert all(s.is_dir() and len(list(s.iterdir())) == 4 for s in sources)  # the sources are untouched


def test_lgm_cache_command(tmp_path):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    D.load_dataset("fashion-mnist", True, data_dir=write_idx(tmp_path / "src", n_train=20, n_test=10),
                   download=False)
    r = CliRunner().invoke(app, ["cache"])
    assert r.exit_code == 0 and str(D.default_data_dir()) in r.output and "MiB" in r.output
    r = CliRunner().invoke(app, ["cache", "--clear"])
    assert r.exit_code == 0 and "removed" in r.output and not D.default_data_dir().exists()


def test_fingerprint_follows_the_content():
    a = torch.utils.data.TensorDataset(torch.arange(12.0).reshape(6, 2), torch.arange(6))
    b = torch.utils.data.TensorDataset(torch.arange(12.0).reshape(6, 2), torch.arange(6))
    assert D.fingerprint(a) == D.fingerprint(b)
    b.tensors[0][3, 1] += 1
    assert D.fingerprint(a) != D.fingerprint(b)
    sub = torch.utils.data.Subset(a, [4, 1])
    assert D.fingerprint(sub) == D.fingerprint(torch.utils.data.TensorDataset(a.tensors[0][[4, 1]],
                                                                             a.tensors[1][[4, 1]]))


def test_a_staged_dataset_is_readable_as_any_file_written_there(tmp_path, monkeypatch):
    """Staged IDX files were 0o600 (their temporaries' mode): in a shared --data-dir nobody else could read
    them.  They now get 0o666 less the umask, as a plain copy would."""
    import os
    import stat

    from lgm_lab.data import load_dataset
    src = write_idx(tmp_path / "src", n_train=20, n_test=10)
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        load_dataset("fashion-mnist", False, data_dir=src)
    finally:
        os.umask(old)
    staged = list((tmp_path / "cache").rglob("*-ubyte"))
    assert staged and {stat.S_IMODE(p.stat().st_mode) for p in staged} == {0o644}
