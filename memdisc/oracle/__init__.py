"""The seed code's semantics as plain ports (memdisc.oracle.seed), the oracles of the parity tests.

Not the op oracle: that is memdisc.ops.reference."""
from memdisc.oracle.seed import (madry_at_perturb, seed_at_correct, seed_batch_md, seed_craft_accumulative,
                                 seed_craft_trigger, seed_dsc_correct, seed_sample_md, seed_train_step)

__all__ = ["seed_batch_md", "seed_sample_md", "seed_dsc_correct", "seed_at_correct", "madry_at_perturb",
           "seed_train_step", "seed_craft_trigger", "seed_craft_accumulative"]
