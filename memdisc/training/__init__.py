"""Training settings: how a victim model is trained, each in its own module.

* ``victim``: what a setting trains: ``trainable_parameters`` (what optimizers, attacks and defences
  differentiate), ``TransferVictim`` (a trained model's features frozen, in eval mode, under a head
  that trains) and ``frozen_copy`` (history copies sharing a frozen backbone);
* ``fit``: the end-to-end and transfer settings on a fixed, possibly poisoned, training set in
  memory (``train_end_to_end``, ``train_transfer``: ``FitConfig`` in, ``TrainingLog`` out; early
  stopping on validation loss, no files);
* ``supervised``: ordinary supervised training that saves snapshots (the burn-in; ``run_burnin``);
* ``online``: the stream loop of the online (accumulative) setting, with an attack, a defence and MD
  recorded (``run_online``: set-up, loop, trigger);
* ``checkpoint``: the online run's resumable state (``OUT/state.pt``).
"""
