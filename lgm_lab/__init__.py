"""lgm-lab: the paper-reproduction application built on the ``lgm_ext`` library.

Models (LeNet++, CIFAR ResNets), heads behind one interface, datasets, the
training loop with checkpoints, the experiments of the source documents, the
figures and the benchmarks.  Importing this package is free: it imports
nothing (the CLI reads :mod:`lgm_lab.config` without loading torch); the
modules import torch, torchvision, matplotlib, scikit-learn and rich as they
need them (``pip install lgm-ext[lab]``).

Layers: ``lgm_ext`` (torch only) <- ``lgm_lab`` <- ``lgm_cli``.
"""
