"""Running a model whose weights are sharded across processes (DeepSpeed ZeRO-3, FSDP2 ``fully_shard``).

Every forward of such a model is collective (the weights are gathered layer by layer), so all processes must
make the same number of forward calls. :class:`Lockstep` guarantees it for work that differs per process: before
each real forward the processes vote; one with nothing left runs a dummy one-row forward for every real forward
still running elsewhere (TRL #6403 pads the last batch with a dummy row the same way).
:func:`deepspeed_engine` wraps a ZeRO-3 model in a DeepSpeed inference engine, as TRL's ``prepare_deepspeed``.
"""

from __future__ import annotations

import copy

import torch


def is_sharded(model) -> bool:
    """True when the weights are partitioned across processes (FSDP2 DTensors, DeepSpeed ZeRO-3)."""
    for p in model.parameters():
        if type(p.data).__name__ == "DTensor" or hasattr(p, "ds_id"):
            return True
    return False


class Lockstep:
    """Same number of forward calls on every process for a sharded model (module docstring)."""

    def __init__(self, model, accelerator, pad_id: int):
        self.model, self.accelerator, self.pad_id = model, accelerator, pad_id
        self.dummy = False
        self.dummies = 0
        self.handle = model.register_forward_pre_hook(self._before, prepend=True)

    def _vote(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    def _before(self, *_):
        if not self.dummy:
            self._vote(1)

    def finish(self) -> None:
        """Run dummy forwards until no process has a real one left, then unhook."""
        try:
            while self._vote(0) > 0:
                ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.accelerator.device)
                self.dummy = True
                try:
                    self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                finally:
                    self.dummy = False
                self.dummies += 1
        finally:
            self.handle.remove()


def deepspeed_engine(model, accelerator):
    """A DeepSpeed inference engine over the (ZeRO-3 partitioned) model, as TRL's ``prepare_deepspeed``."""
    import deepspeed
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and zero.get("stage") == 3:
        zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                    stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero.pop("offload_optimizer", None)
    if zero.get("stage") != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
