"""Issue 33: lgm_lab.ood_adapters against the real pytorch-ood (skipped without it) -- our detector as a
pytorch-ood detector, and pytorch-ood's detectors with our threshold."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("pytorch_ood")

from pytorch_ood.api import FeaturesDetector  # noqa: E402
from pytorch_ood.detector import Mahalanobis  # noqa: E402

from lgm_ext import LikelihoodDetector  # noqa: E402
from lgm_lab.ood_adapters import PytorchOODLikelihood  # noqa: E402

K, D, IN = 3, 5, 10


def _ranks(v: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(v, dtype=torch.float64)
    r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
    return r


def _spearman(a, b) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.fixture(scope="module")
def tiny():
    """A tiny encoder (images in R^10 -> features in R^5) over three Gaussian classes, and inputs from elsewhere."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # module-scoped: the weights must not depend on which tests ran before
    encoder = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, D))
    centers = 2.0 * torch.randn(K, IN, generator=g)
    y = torch.randint(0, K, (600,), generator=g)
    x = centers[y] + 0.5 * torch.randn(600, IN, generator=g)
    test = centers[torch.randint(0, K, (200,), generator=g)] + 0.5 * torch.randn(200, IN, generator=g)
    far = 6.0 * torch.randn(200, IN, generator=g)
    with torch.no_grad():
        return encoder.eval(), x, y, test, far, encoder(x), encoder(test), encoder(far)


def test_our_tied_detector_ranks_as_pytorch_oods_mahalanobis(tiny):
    encoder, x, y, test, far, fx, ft, ff = tiny
    theirs = Mahalanobis(None).fit_features(fx, y)
    ours = PytorchOODLikelihood(covariance="tied").fit_features(fx, y)
    assert isinstance(ours, FeaturesDetector)
    z = torch.cat([ft, ff])
    a, b = ours.predict_features(z), theirs.predict_features(z)
    # the same ranking up to float32 near-ties (an adjacent swap of 400 scores moves the coefficient by 1e-7;
    # another covariance or sign moves it by far more)
    assert _spearman(a, b) == pytest.approx(1.0, abs=1e-5)
    # the same direction: higher = more abnormal (the points from elsewhere score higher)
    assert a[200:].median() > a[:200].median() and b[200:].median() > b[:200].median()
    assert torch.equal(a, -ours.detector.score(z))


def test_pytorch_ood_likelihood_fit_predict_with_an_encoder_and_a_loader(tiny):
    encoder, x, y, test, far, fx, ft, ff = tiny
    y_ood = y.clone()
    y_ood[:50] = -1  # pytorch-ood's mark of an OOD sample: left out of the fit
    loader = DataLoader(TensorDataset(x, y_ood), batch_size=64)
    det = PytorchOODLikelihood(encoder, covariance="diag").fit(loader)
    ref = LikelihoodDetector.fit(fx[50:], y[50:], "diag")
    torch.testing.assert_close(det.predict(test), -ref.score(ft))
    torch.testing.assert_close(det(test), det.predict_features(ft))  # __call__ is predict
    # a wrapped detector is refitted in place (LikelihoodDetector's instance fit)
    head_det = LikelihoodDetector.fit(fx, y, "identity")
    wrapped = PytorchOODLikelihood(detector=head_det, covariance="tied").fit_features(fx, y)
    assert wrapped.detector is head_det and head_det.covariance == "tied"
    from pytorch_ood.api import ModelNotSetException, RequiresFittingException

    with pytest.raises(RequiresFittingException):
        PytorchOODLikelihood().predict_features(ft)
    with pytest.raises(ModelNotSetException):
        PytorchOODLikelihood().predict(test)
    with pytest.raises(ValueError, match="y"):
        PytorchOODLikelihood().fit_features(fx, torch.full_like(y, -1))
