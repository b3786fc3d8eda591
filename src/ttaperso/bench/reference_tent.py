"""A reference-structure TENT baseline, timed side by side with ttaperso's ``tent``.

Written from the paper (Wang et al., ICLR 2021) and FACTS.md's description of the
official code's structure (DequanWang/tent), not copied from it:

* the model in train mode, every BatchNorm normalising with the current batch's statistics
  (running statistics dropped: ``track_running_stats=False``, buffers ``None``);
* only the BN affine parameters require gradients; Adam (lr 1e-3) over them;
* per batch: forward, mean softmax entropy, backward, one optimizer step, zero grads;
* the outputs returned are those computed before the step.

There is one model for everyone (the reference has no notion of subjects), and unlike the
reference it works on its own deep copy, so the benchmark's frozen baseline is untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["ReferenceTent"]


class ReferenceTent:
    """Episodic-free, single-stream TENT with the official code's structure."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        self.model = copy.deepcopy(model)
        self.model.train()
        self.model.requires_grad_(False)
        params: list[nn.Parameter] = []
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
                module.requires_grad_(True)
                params += [p for p in (module.weight, module.bias) if p is not None]
        if not params:
            raise ValueError("the model has no BatchNorm affine parameters to adapt")
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @torch.enable_grad()
    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """Predict ``x`` and take one entropy-minimisation step; return the pre-step logits."""
        outputs = self.model(x)
        log_probs = outputs.log_softmax(dim=1)
        loss = -(log_probs.exp() * log_probs).sum(dim=1).mean(dim=0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return outputs.detach()
