"""Where :class:`LikelihoodDetector` and the threshold convention were imported from before the detector family
(:mod:`lgm_ext.detectors`); kept so that ``from lgm_ext.detector import ...`` goes on working."""
from .detectors.gaussian import COVARIANCES, SCORES, LikelihoodDetector, calibrated_threshold, check_fpr

__all__ = ["COVARIANCES", "SCORES", "LikelihoodDetector", "calibrated_threshold", "check_fpr"]
