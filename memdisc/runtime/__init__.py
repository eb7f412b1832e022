"""How the correction loops execute, apart from what they compute: the memory format and
autocast of the model passes (:mod:`memdisc.runtime.precision`) and the CUDA-graph capture
and replay of a fixed-length loop (:mod:`memdisc.runtime.cuda_graphs`); and where they run: the
device an entry point resolves once (:mod:`memdisc.runtime.device`)."""
from memdisc.runtime.cuda_graphs import CapturedLoop
from memdisc.runtime.precision import Precision

__all__ = ["Precision", "CapturedLoop"]
