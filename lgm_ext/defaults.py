"""Defaults that the library and the application share, each written once.

A plain module without imports: :mod:`lgm_lab.config` reads this file without importing
``lgm_ext`` (which loads torch), so ``lgm --help`` shows these values and stays fast.
"""

# The inverse adversary (inverse-adversary report, Eq. 3; docs/SPEC.md section 4): PGD that descends the
# loss of the true label inside an L-inf ball of radius eps', in steps of alpha'.
INVERSE_EPS = 4 / 255
INVERSE_STEP = 2 / 255
INVERSE_STEPS = 5

# The L-GM head (paper: alpha = 1, lambda = 0.1); log_var is clamped to +-LOG_VAR_BOUND in every forward.
LGM_ALPHA = 1.0
LGM_LAMBDA = 0.1
LOG_VAR_BOUND = 6.0

# Wen et al.'s center update rate (Eq. 4).
CENTER_RATE = 0.5

# The head's learning-rate multiplier (the L-GM means and log-variances follow the feature clusters).
HEAD_LR_MULT = 10.0

# LGMLoss reads its divergence record (a NaN or infinite loss or features) every this many training steps: one host
# sync per that many steps (its cost: benchmarks/RECIPE.md).
CHECK_FINITE_EVERY = 50
