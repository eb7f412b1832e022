"""Evaluation: what a run measures and the record it leaves.

* ``classification``: the clean test error of a model (``error_rate``, ``eval_mode``) and the attack
  success rate of a backdoor (``attack_success_rate``);
* ``detection``: a poison score judged as a detector (ROC, AUROC, TPR at a fixed FPR);
* ``recorder``: ``RunRecord``, what an online run has recorded so far (saved for resuming);
* ``result``: ``RunResult``, the typed result of one online run (``result.json``).
"""
