"""What every distilled student of a latent teacher shares (LCM, flow students): the teacher's parts (VAE, prompt
encoder) held beside the trainable function and never copied or checkpointed, and a LoRA student's checkpoints
holding its adapter alone; and the teacher pass of a LoRA student, its own network with the adapter switched off."""

from __future__ import annotations

import contextlib
import copy


class SharedPartsStudent:
    """A mixin for an ``nn.Module`` student with ``self.parts`` (set through ``__dict__``, so it is no submodule)
    and ``self.lora``."""

    lora = False

    def __deepcopy__(self, memo):
        """Copies (EMAs, the target network, the exported copy) share the teacher's parts instead of copying them.
        A LoRA student lives in the teacher's own network, so its copies share that too: it keeps no EMA or target
        network (its builds refuse them)."""
        memo[id(self.parts)] = self.parts
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if "lora_" in k} if self.lora else full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.lora:
            return super().load_state_dict(state_dict, strict, assign)
        if set(state_dict) != set(self.state_dict()):
            raise ValueError("the LoRA weights do not fit this adapter (other rank, targets or base network)")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


@contextlib.contextmanager
def adapters_off(network):
    """The network with its peft adapters disabled for the block (a LoRA student's teacher pass)."""
    network.disable_adapters()
    try:
        yield network
    finally:
        network.enable_adapters()
