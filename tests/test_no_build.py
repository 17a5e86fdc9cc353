"""An install without a compiler (issue 36): `LGM_EXT_NO_BUILD=1 pip install .` gives a working package whose
operators run the pure-PyTorch path -- the same API, checks, gradients and errors; `import lgm_ext` warns once
and `lgm info` says which path is active.  The package is installed for real (pip, into a folder of its own) and
exercised in a fresh interpreter that cannot see the built extension."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# This checkout's editable install (a finder after the path finder) would hand the fresh interpreter its built
# extension for `lgm_ext._C`: dropped, so the interpreter sees only the no-build install, as a machine without
# a compiler would.
_HIDE_BUILD = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if not getattr(f, '__module__', '').startswith('__editable__')]\n")

# Run in the no-build install: every public operator and module against the values the fused kernels give here.
_CHECKS = _HIDE_BUILD + textwrap.dedent('''
    import sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import lgm_ext
        import lgm_ext.functional  # a second import does not warn again
    assert sum("pure-PyTorch path" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
    assert "site-packages" not in lgm_ext.__file__ and lgm_ext.__file__.startswith(sys.argv[1]), lgm_ext.__file__
    assert not lgm_ext.has_fused_kernels() and not lgm_ext.has_cuda_kernels()
    import torch
    expected = torch.load(sys.argv[2], weights_only=True)
    x, mu, s, y = (expected[k] for k in ("x", "mu", "s", "y"))
    for t in (x, mu, s):
        t.requires_grad_()
    loss = lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected["loss"])
    for name, t in (("gx", x), ("gmu", mu), ("gs", s)):
        torch.testing.assert_close(t.grad, expected[name])
    torch.testing.assert_close(lgm_ext.lgm_logits(x, mu, s).detach(), expected["logits"])
    torch.testing.assert_close(lgm_ext.lgm_log_likelihood(x, mu, s).detach(), expected["ll"])
    torch.testing.assert_close(lgm_ext.pgd_step(x.detach(), x.grad, x.detach() * 0, alpha=0.1, eps=0.05),
                               expected["pgd"])
    # bfloat16 storage computes in float32, as the kernels do
    lb = lgm_ext.lgm_loss(x.detach().bfloat16(), mu.detach().bfloat16(), s.detach().bfloat16(), y)
    assert lb.dtype == torch.float32
    # float64 gradcheck through the module
    m = lgm_ext.LGMLoss(3, 4, alpha=1.0, lambda_=0.1).double()
    xd = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: m(f, torch.tensor([0, 1, 2, 0, 1]))[0], (xd,))
    # the same errors as the kernels
    errors = 0
    for call, kind, word in (
            (lambda: lgm_ext.lgm_loss(x, mu[:, :2], s, y), ValueError, "feature dimension"),
            (lambda: lgm_ext.lgm_loss(x, mu, s, y.float()), TypeError, "integer"),
            (lambda: lgm_ext.lgm_loss(x, mu, s, y + 10), ValueError, "[0, K)"),
            (lambda: lgm_ext.lgm_loss(x.int(), mu, s, y), TypeError, "features must be"),
            (lambda: lgm_ext.lgm_loss(x, mu.double(), s, y), TypeError, "dtype"),
            (lambda: lgm_ext.pgd_step(x, x[:1], x, alpha=0.1, eps=0.1), ValueError, "shape"),
            (lambda: lgm_ext.lgm_loss(x, mu, s, y, alpha=-1.0), ValueError, "alpha")):
        try:
            call()
        except kind as err:
            assert word in str(err), (word, str(err))
            errors += 1
    assert errors == 7
    # the detector, an attack, the deployable module
    from lgm_ext.attacks import FGSM
    det = lgm_ext.LikelihoodDetector.fit(x.detach(), y, "tied").calibrate(x.detach(), 0.1)
    assert det.reject(x.detach() + 100).all()
    clf = lgm_ext.Classifier(torch.nn.Linear(4, 4), lgm_ext.LGMLoss(3, 4))
    adv = FGSM(clf, eps=0.1)(torch.rand(6, 4), y[:6])
    assert adv.shape == (6, 4)
    # issue 43: the in-place step and the attacks built on it (they called a private torch._C function that
    # torch 2.14.1 lacks)
    from lgm_ext.attacks import PGD, InversePGD
    z = x.detach().clone()
    assert lgm_ext.pgd_step_(z, x.grad, x.detach() * 0, alpha=0.1, eps=0.05) is z
    torch.testing.assert_close(z, expected["pgd"])
    clean = torch.rand(6, 4)
    for attack in (PGD(clf, eps=0.1, alpha=0.02, steps=3, seed=0), InversePGD(clf)):
        out = attack(clean, y[:6])
        assert out.shape == (6, 4) and (out - clean).abs().max() <= 0.1 + 1e-6
    try:
        import lgm_ext.distributed
        lgm_ext.distributed.ShardedLGMLoss(3, 4)
        raise AssertionError("ShardedLGMLoss without kernels")
    except RuntimeError as err:
        assert "compiled kernels" in str(err)
    print("ok")
''')


@pytest.fixture(scope="module")
def no_build_install(tmp_path_factory):
    target = tmp_path_factory.mktemp("no-build")
    env = {**os.environ, "LGM_EXT_NO_BUILD": "1", "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not list(target.glob("lgm_ext/_C*")), "LGM_EXT_NO_BUILD=1 built the extension"
    return target


def test_a_package_installed_without_a_compiler_works(no_build_install, tmp_path):
    import torch

    import lgm_ext
    from lgm_ext.attacks import FGSM  # noqa: F401  (the same public names)

    g = torch.Generator().manual_seed(0)
    x, mu, s = torch.randn(8, 4, generator=g), torch.randn(3, 4, generator=g), 0.3 * torch.randn(3, 4, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    xs, mus, ss = (t.clone().requires_grad_() for t in (x, mu, s))
    loss = lgm_ext.lgm_loss(xs, mus, ss, y, alpha=1.0, lambda_=0.1)  # the fused kernels, in this process
    loss.backward()
    expected = {"x": x, "mu": mu, "s": s, "y": y, "loss": loss.detach(), "gx": xs.grad, "gmu": mus.grad,
                "gs": ss.grad, "logits": lgm_ext.lgm_logits(x, mu, s), "ll": lgm_ext.lgm_log_likelihood(x, mu, s),
                "pgd": lgm_ext.pgd_step(x, xs.grad, x * 0, alpha=0.1, eps=0.05)}
    torch.save(expected, tmp_path / "expected.pt")
    env = {**os.environ, "PYTHONPATH": str(no_build_install)}
    r = subprocess.run([sys.executable, "-c", _CHECKS, str(no_build_install), str(tmp_path / "expected.pt")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]


def test_lgm_info_says_which_path_is_active(no_build_install, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(no_build_install), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-c", _HIDE_BUILD + "from lgm_cli.app import main; sys.argv = ['lgm', 'info']; "
                        "main()"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0 and "pure PyTorch" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "lgm_cli.app", "info"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert r.returncode == 0 and "fused C++ kernels" in r.stdout, r.stdout + r.stderr
