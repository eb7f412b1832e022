"""Evaluation: what a run measures and the record it leaves.

* ``classification``: the clean test error of a model (``error_rate``), its mean loss and accuracy
  (``loss_and_accuracy``), its accuracy per class (``per_class_accuracy``), the attack success rate of
  a backdoor (``attack_success_rate``), and the eval-mode pass they share (``eval_outputs``,
  ``eval_mode``);
* ``probe``: the linear probe of a model's penultimate features (``penultimate_features``,
  ``linear_probe_accuracy``: scikit-learn's logistic regression, as the seed's ``model_evaluation.py``);
* ``saliency``: input-gradient saliency maps (``saliency_maps``, the seed's keras-vis vanilla maps);
* ``detection``: a poison score judged as a detector (ROC, AUROC, TPR at a fixed FPR);
* ``recorder``: ``RunRecord``, what an online run has recorded so far (saved for resuming);
* ``result``: ``RunResult``, the typed result of one online run (``result.json``).
"""
