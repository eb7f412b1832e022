"""Plain reference ports of the seed code's semantics (oracles for the parity tests)."""
from memdisc.reference.seed import (madry_at_perturb, seed_at_correct, seed_batch_md, seed_craft_accumulative,
                                    seed_craft_trigger, seed_dsc_correct, seed_sample_md, seed_train_step)

__all__ = ["seed_batch_md", "seed_sample_md", "seed_dsc_correct", "seed_at_correct", "madry_at_perturb",
           "seed_train_step", "seed_craft_trigger", "seed_craft_accumulative"]
