"""Issue 13: the pipeline a researcher trusts (resume, overwrite, data, hyper-parameters, checkpoint
hashes, metrics, attack modes, one-line CLI errors)."""
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lgm_lab import data as D


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


# ----------------------------------------------------------------------------- defect 7
@pytest.mark.parametrize("name", ["FGSM", "TargetedFGSM", "PGD", "InversePGD"])
def test_attacks_restore_each_submodules_mode(name):
    from lgm_ext import attacks

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[2].eval()
    atk = getattr(attacks, name)(model, eps=0.1)
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    if name == "PGD":
        atk = attacks.PGD(model, eps=0.1, steps=2, seed=0)
    atk(x, y)
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]
    model.eval()
    model[3].train()
    atk(x, y)
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False]
