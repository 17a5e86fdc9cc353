"""The source documents' experiments (docs/SPEC.md section 5), one module (or package) each, over shared
code.

Shared (import no experiment):

- :mod:`~lgm_lab.experiments.stats`: means over seeds, binomial errors, the z-test and its verdict words;
- :mod:`~lgm_lab.experiments.measure`: attacks over batches, FGSM errors, verification (ROC, EER),
  class means, center comparisons, compactness;
- :mod:`~lgm_lab.experiments.runs`: run configurations, train-or-reuse, cached measurements.

Experiments (siblings; they never import each other):

- :mod:`~lgm_lab.experiments.paper`: the L-GM paper's Tables 1 and 6, adversarial verification, claims;
- :mod:`~lgm_lab.experiments.centers`: the inverse-adversary report's centers comparison and claims;
- :mod:`~lgm_lab.experiments.inverse`: inverse-adversary centers trained into the loss (models A, B, C);
- :mod:`~lgm_lab.experiments.budget`: the budget curve -- every head against SGD steps (``lgm budget``);
- :mod:`~lgm_lab.experiments.likelihood`: why the L-GM head's own likelihood fails out of distribution --
  interventions on how the head trains (``lgm likelihood``).

On top: :mod:`~lgm_lab.experiments.reproduce`, the only module that knows every experiment
(``lgm reproduce``).  Importing this package imports none of them.
"""
