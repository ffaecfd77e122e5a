"""adapterops under the HF `Trainer` and TRL's `SFTTrainer`.

    from adapterops.integrations.transformers import BalanceLossMixin, LaMDABFreezeCallback, add_balance_loss

    trainer = Trainer(model=lamda_model, args=args, train_dataset=data,
                      callbacks=[LaMDABFreezeCallback(eta=0.3)])
    add_balance_loss(hydra_model)      # once, before training: the loss includes the balance loss

    class HydraSFTTrainer(BalanceLossMixin, SFTTrainer):   # TRL computes its own loss
        pass

- `LaMDABFreezeCallback` runs `adapterops.lamda.BFreezeSchedule` from the Trainer's step
  count, so a resumed run freezes exactly where the uninterrupted one does, and keeps its
  state in the checkpoint's trainer_state.json (a transformers `ExportableState`).
- `add_balance_loss` makes a model's HydraLoRA balance losses part of its output's `loss`, as
  transformers' MoE models add their router loss, so the Trainer needs no `compute_loss`
  (TRL's SFTTrainer drops that loss: there the hook raises, and `BalanceLossMixin` adds the
  balance loss to the trainer's own).

Checkpoints need nothing here: an injected model's `save_pretrained` is adapterops' (see
`adapterops.saving`), which the Trainer's checkpoints, `save_model`, `resume_from_checkpoint`
and `load_best_model_at_end` use as they are. This module imports transformers when imported.
"""
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..hydra import collect_balance_loss
from ..lamda import BFreezeSchedule

__all__ = ["LaMDABFreezeCallback", "add_balance_loss", "BalanceLossMixin"]


class LaMDABFreezeCallback(TrainerCallback, ExportableState):
    """LaMDA's gradual freezing of B (`adapterops.lamda.BFreezeSchedule`) under the Trainer.

    At `on_train_begin` it builds the schedule over `total_steps` (None: the Trainer's
    `max_steps`) with the Trainer's optimizer (so partly frozen columns also get their Adam or
    momentum state zeroed) and marks each layer's B frozen or not from the Trainer's
    `global_step`, which a resumed run restores. Before each optimizer step
    (`on_pre_optimizer_step`) it runs `schedule.step()` with the step count taken from the
    Trainer: the number of optimizer steps already taken. The Trainer clips the gradient norm
    (`max_grad_norm`) before that event, so the norm still includes the columns being frozen.

    Its state (`eta`, `total_steps`, the steps taken) goes into each checkpoint's
    trainer_state.json; on resume the Trainer rebuilds the callback from it (with
    `restore_callback_states_from_checkpoint=True`) or keeps the one passed: either way the
    step count comes from the restored `global_step`.
    """

    def __init__(self, eta: float = 0.3, total_steps: Optional[int] = None):
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"LaMDABFreezeCallback: eta must be in (0, 1], got {eta!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"LaMDABFreezeCallback: total_steps must be None or a positive int, "
                             f"got {total_steps!r}")
        self.eta, self.total_steps = eta, total_steps
        self.steps_taken = 0
        self.schedule: Optional[BFreezeSchedule] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        total = self.total_steps or state.max_steps
        self.schedule = BFreezeSchedule(model, total, self.eta, optimizer=optimizer)
        self.schedule.load_state_dict({"step_count": state.global_step, "total_steps": total,
                                       "eta": self.eta})
        self.steps_taken = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.schedule is None:
            raise RuntimeError("LaMDABFreezeCallback: on_train_begin did not run (pass the "
                               "callback to the Trainer's callbacks=)")
        self.schedule.step_count = state.global_step
        self.schedule.step()
        self.steps_taken = self.schedule.step_count

    def state(self) -> dict:
        return {"args": {"eta": self.eta, "total_steps": self.total_steps},
                "attributes": {"steps_taken": self.steps_taken}}


def add_balance_loss(model: nn.Module):
    """Adds the HydraLoRA layers' balance losses to `model`'s output `loss`, as transformers'
    MoE models add their router loss, so the HF Trainer (which trains on `outputs["loss"]`)
    needs no `compute_loss`; returns the hook's handle (`handle.remove()` undoes it).

    After each forward that left balance losses in the layers (training mode,
    `balance_loss_weight > 0`), a forward hook collects them
    (`adapterops.hydra.collect_balance_loss`, which clears them) and adds their sum to the
    output's `loss` (a transformers ModelOutput given labels). An output without a loss, or a
    tuple (`return_dict=False`), keeps them in the layers for `collect_balance_loss`. The weight
    applies per forward: with gradient accumulation each micro-batch adds its own (the
    Trainer's token-count normalisation leaves it, as it leaves the MoE router loss).

    TRL's SFTTrainer computes its own loss from the log-probabilities of its fused LM head and
    drops the output's `loss` (it adds an auxiliary loss only for MoE configs): on that output,
    with gradients enabled, the hook raises a RuntimeError rather than let the balance loss
    vanish: train with `BalanceLossMixin` there instead. Under no_grad (evaluation) it adds the
    balance loss as on any output.

    Under activation checkpointing, use the non-reentrant kind (transformers' default): the
    reentrant kind's first pass runs without autograd, and the collection raises a
    RuntimeError rather than train the router without its balance gradient.

    ValueError for a model without a HydraLoRA layer that has `balance_loss_weight > 0`. A
    second call returns the first call's handle while it is registered.
    """
    if not any(getattr(m, "balance_loss_weight", 0) > 0 for m in model.modules()):
        raise ValueError("add_balance_loss: the model has no HydraLoRA layer with "
                         "balance_loss_weight > 0 (AdapterConfig(method='hydra', "
                         "balance_loss_weight=...))")
    existing = getattr(model, "_adapterops_balance_hook", None)
    if existing is not None and existing.id in model._forward_hooks:
        return existing

    def add_to_output(module, args, output):
        if not (hasattr(output, "keys") and output.get("loss") is not None
                and any(getattr(m, "last_balance_loss", None) is not None for m in module.modules())):
            return output
        if type(output).__name__ == "FusedCausalLMOutput" and torch.is_grad_enabled():
            raise RuntimeError(
                "add_balance_loss: TRL's SFTTrainer computes its loss from the fused LM head's "
                "log-probabilities and drops the output's loss, so the HydraLoRA balance loss "
                "would not train the router. Train with adapterops.integrations.transformers."
                "BalanceLossMixin instead of this hook: class HydraSFTTrainer(BalanceLossMixin, "
                "SFTTrainer): pass")
        output["loss"] = output["loss"] + collect_balance_loss(module)
        return output

    handle = model.register_forward_hook(add_to_output)
    model._adapterops_balance_hook = handle
    return handle



class BalanceLossMixin:
    """Adds the HydraLoRA layers' balance losses to the loss a Trainer's `compute_loss`
    returns, for trainers that compute their own loss (TRL's SFTTrainer: from its fused LM
    head's log-probabilities, dropping the model's `loss`). Put it first among the bases:

        class HydraSFTTrainer(BalanceLossMixin, SFTTrainer):
            pass

    The loss is the trainer's own, then `+ adapterops.hydra.collect_balance_loss(model)` (which
    clears the layers' losses; zero in evaluation, where the layers keep none); the weight
    applies per forward, as with `add_balance_loss`. Needs no `add_balance_loss` (with it, the
    model's `loss` already holds the balance and the collection here finds none; under
    SFTTrainer the hook would refuse TRL's output).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # return_outputs as asked: TRL answers True with a second forward, under no_grad.
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = loss + collect_balance_loss(model).to(loss.device)
        return (loss, result[1]) if return_outputs else loss
