"""Frozen sub-models that a trainable module uses but does not own as parameters.

The text towers, the face ViT, the CLIP image model and the VAE are never trained. Holding them
outside the module tree keeps them out of `state_dict()`, so checkpoints and exports carry only
what training changes (the frozen parts reload from their own weights), out of the optimiser
and out of DDP's gradient buckets. `.to()`, `.cuda()` and dtype casts still reach them, and
they stay in eval mode whatever `train()` is called with (the face ViT has BatchNorm layers).
"""

from __future__ import annotations

from torch import nn


class HoldsFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        self._frozen: dict[str, nn.Module] = {}

    def hold(self, name: str, module: nn.Module) -> nn.Module:
        module.eval().requires_grad_(False)
        self._frozen[name] = module
        return module

    def frozen(self, name: str) -> nn.Module:
        return self._frozen[name]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for module in self._frozen.values():
            module._apply(fn, recurse)
        return self
