"""``ModulesToSave``: a module trained in full next to the adapters (a classification head, say)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """A module trained in full: one copy per adapter, the original kept for ``disable_adapters``.

    Mirrors PEFT's ``ModulesToSaveWrapper`` (``original_module`` / ``modules_to_save.<adapter>``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        for param in module.parameters():
            param.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        # in the wrapped module's train/eval mode, like the copies deepcopy makes of it
        self.training = self.modules_to_save.training = module.training
        self.active_adapter: str | None = None
        self.adapters_disabled = False

    def add_adapter(self, name: str) -> None:
        """Add a trainable copy of the original module for adapter ``name``."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        clone = copy.deepcopy(self.original_module)
        self.modules_to_save[name] = clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active adapter's copy, or the original when disabled or absent."""
        if self.adapters_disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Let model code read attributes like `.weight` or `.out_features` of the head.
            modules = self._modules
            if "original_module" in modules:
                active = self.__dict__.get("active_adapter")
                saved = modules.get("modules_to_save")
                target = (
                    saved[active]
                    if saved is not None and active in saved
                    else modules["original_module"]
                )
                return getattr(target, name)
            raise
