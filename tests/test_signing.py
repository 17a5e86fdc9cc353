"""Optional signatures (issue 42, lgm_lab.signing): HMAC-SHA256 of a file's content digest with a key the user
holds; a checkpoint edited and re-hashed, unsigned or signed with another key is refused when a key is set; what
no training writes is refused whatever the digest."""
import pytest
import torch

from lgm_lab import signing
from lgm_lab.checkpoints import CheckpointError, content_digest, load_checkpoint, save_checkpoint

KEY = "k" * 32


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(signing.KEY_VARIABLE, raising=False)
    monkeypatch.delenv(signing.KEY_FILE_VARIABLE, raising=False)


def test_the_key_comes_from_the_environment(monkeypatch, tmp_path):
    assert signing.signing_key() is None and signing.sign("d", purpose="p") is None
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    assert signing.signing_key() == KEY.encode()
    monkeypatch.setenv(signing.KEY_VARIABLE, "short")
    with pytest.raises(signing.SigningKeyError, match="at least 16"):
        signing.signing_key()
    monkeypatch.delenv(signing.KEY_VARIABLE)
    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    monkeypatch.setenv(signing.KEY_FILE_VARIABLE, str(f))
    assert signing.signing_key() == KEY.encode()  # the newline an editor adds is not part of it
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    with pytest.raises(signing.SigningKeyError, match="both"):
        signing.signing_key()
    monkeypatch.delenv(signing.KEY_VARIABLE)
    monkeypatch.setenv(signing.KEY_FILE_VARIABLE, str(tmp_path / "missing"))
    with pytest.raises(signing.SigningKeyError, match="cannot read"):
        signing.signing_key()


def test_sign_and_verify(monkeypatch):
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    sig = signing.sign("digest", purpose="lgm-ext checkpoint")
    assert len(sig) == 64
    assert signing.verify("digest", sig, purpose="lgm-ext checkpoint", path="f")
    with pytest.raises(ValueError, match="f: its signature does not match"):
        signing.verify("other digest", sig, purpose="lgm-ext checkpoint", path="f")
    with pytest.raises(ValueError, match="does not match"):  # a checkpoint's signature is no detector file's
        signing.verify("digest", sig, purpose="lgm-ext detector file", path="f")
    with pytest.raises(ValueError, match="f: it is not signed"):
        signing.verify("digest", None, purpose="lgm-ext checkpoint", path="f")
    monkeypatch.delenv(signing.KEY_VARIABLE)
    assert signing.verify("digest", None, purpose="lgm-ext checkpoint", path="f") is False  # no key: no check


def _checkpoint(tmp_path, name="ck.pt"):
    path = tmp_path / name
    save_checkpoint(path, {"config": {"dataset": "fashion-mnist"}, "epoch": 1,
                           "model": {"fc.weight": torch.ones(2, 3), "bn.running_var": torch.ones(3),
                                     "bn.num_batches_tracked": torch.tensor(4)},
                           "head": {"means": torch.zeros(10, 2)}, "optimizer": {"state": {}, "param_groups": []}})
    return path


def _edit(path, change):
    """What someone without the key can do: edit the content and recompute its SHA-256."""
    ck = torch.load(path, weights_only=True)
    ck.pop("sha256")
    change(ck)
    ck["sha256"] = content_digest(ck)
    torch.save(ck, path)


def test_a_checkpoint_signed_with_the_key_loads_and_an_edit_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    path = _checkpoint(tmp_path)
    ck = load_checkpoint(path)
    assert isinstance(ck["signature"], str)
    _edit(path, lambda c: c["head"]["means"].add_(100.0))
    with pytest.raises(CheckpointError, match="signature does not match"):
        load_checkpoint(path)
    monkeypatch.delenv(signing.KEY_VARIABLE)
    assert load_checkpoint(path)["epoch"] == 1  # without a key, the digest alone: an edit re-hashed loads
    unsigned = _checkpoint(tmp_path, "unsigned.pt")
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    with pytest.raises(CheckpointError, match="unsigned.pt: it is not signed"):
        load_checkpoint(unsigned)
    monkeypatch.setenv(signing.KEY_VARIABLE, "another key, also of 32 bytes...")
    other = _checkpoint(tmp_path, "other.pt")  # signed with another key
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    with pytest.raises(CheckpointError, match="other.pt: its signature does not match"):
        load_checkpoint(other)


@pytest.mark.parametrize("change, word", [
    (lambda c: c["model"]["fc.weight"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda c: c["head"]["means"].__setitem__((0, 0), float("inf")), "non-finite"),
    (lambda c: c["model"]["bn.running_var"].__setitem__(0, -1.0), "negative"),
    (lambda c: c["model"].__setitem__("bn.num_batches_tracked", torch.tensor(-3)), "negative"),
])
def test_what_no_training_writes_is_refused_whatever_its_digest(tmp_path, change, word):
    """A checkpoint whose weights are NaN, its SHA-256 recomputed, evaluated (error 90.6%, exit 0)."""
    path = _checkpoint(tmp_path)
    _edit(path, change)
    with pytest.raises(CheckpointError, match=f"{word}.*no training writes|{word}.*which no training"):
        load_checkpoint(path)
