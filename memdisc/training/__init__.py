"""Training settings: how a victim model is trained, each in its own module.

* ``supervised``: ordinary supervised training that saves snapshots (the burn-in; ``run_burnin``);
* ``online``: the stream loop of the online (accumulative) setting, with an attack, a defence and MD
  recorded (``run_online``: set-up, loop, trigger);
* ``checkpoint``: the online run's resumable state (``OUT/state.pt``).
"""
