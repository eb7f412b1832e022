"""Saliency maps: how strongly each pixel moves a model's loss on a sample (Simonyan et al.'s vanilla
input gradient).

    S_i[h, w] = max_c | d CE(f(x_i), y_i) / d x_i[c, h, w] |

The seed (changhongyan123/poisoning ``visualization.py``) draws keras-vis ``visualize_saliency``
maps; memdisc matches its vanilla variant (``backprop_modifier=None``: the plain input gradient, not
'guided' or 'relu' back-propagation) with its defaults ``grad_modifier='absolute'`` and the maximum
over channels.  Two departures: keras-vis differentiates the class *logit* ``f(x)_y`` (the seed
swaps the softmax for a linear activation), memdisc the cross-entropy of the true label,
``-log softmax(f(x))_y``, whose input gradient is ``sum_k (p_k - [k = y]) d f(x)_k / d x``: the
pixels that would change the model's confidence in the right class against the others; and
keras-vis rescales each map to [0, 1], memdisc returns the raw magnitudes, so maps of one sample
under several models stay comparable (a figure scales them as it shows them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memdisc.checks import check_batch
from memdisc.eval.classification import eval_mode

__all__ = ["saliency_maps"]


def saliency_maps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` the saliency of every sample (module docstring), detached, on x's device.

    Args:
        model: a classifier of x (logits [N, C]); run in eval mode (restored afterwards), so each map
            depends on its own sample only.  Its parameters are not changed and get no ``.grad``.
        x: ``[N, C, H, W]`` float pixels in [0, 1] on the model's device; y: ``[N]`` int64 true labels.
    Raises:
        ValueError: naming ``x`` (not ``[N, C, H, W]``) or ``y``.
    """
    check_batch("x", x, "y", y)
    if x.dim() != 4:
        raise ValueError(f"x: expected [N, C, H, W] images, got a tensor of shape {tuple(x.shape)}")
    x = x.detach().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        # summed, so that each sample's gradient is that of its own cross-entropy
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.abs().amax(dim=1)
