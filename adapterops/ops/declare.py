"""One declaration per differentiable op: from its forward, its gradients, what it saves and
its fake shapes, the two doors onto the same functions.

An op file writes (see `adapterops.ops.lowrank` for one):
- `forward(x, weight, bias, <adapter tensors>, scaling, <options>, backend) -> (y, ...)`:
  annotated for `torch.library` (its schema is inferred from them), x 2-D; it asks the
  dispatcher for a backend and calls the family's forward, which may return None for an
  output that is not there (the custom op returns the fake's empty tensor for it; eagerly
  an empty tensor costs a microsecond for nothing);
- `gradients(<output grads>, <saved tensors>, <options>, <need flags>, backend)`: the gradients
  of the `trained` inputs, in their order, None where not asked for (`options` names the
  forward's non-tensor inputs it takes, scaling by default); `reads` names the saved
  tensors each one reads (the custom op refuses a None for them);
- `save(inputs, outputs, needs) -> tuple`: the memory contract, what backward keeps. Its
  first tensor is x (or None), which the base layer's own dW also reads;
- `fake(*inputs)`: the forward's outputs as empty tensors of the right shapes.

`DeclaredOp` turns these into
- the `torch.library` custom ops `adapterops::<name>_fwd` and `adapterops::<name>_bwd`
  (`torch.compile(fullgraph=True)` traces through them; their dispatcher costs tens of
  microseconds per eager call), with fakes (the backward's from the trained inputs' shapes)
  and autograd;
- the eager door, a `torch.autograd.Function` running the same forward, context and backward
  (a few microseconds per call).
`DeclaredOp.__call__` takes the custom op while compiling and the eager door otherwise; both
are tested against each other bit for bit. Inputs are (x, weight, bias, ...): weight and bias
get the base layer's gradients dW = dY^T x and dbias = Σ_tokens dY when a user trains them.
Double backward is not supported.
"""
import inspect
import math
import operator
from typing import Callable, Optional

import torch
from torch import Tensor


def base_layer_grads(grad_y: Tensor, x: Optional[Tensor], need_weight: bool, need_bias: bool):
    """(dW, dbias) of the frozen base layer y = x W^T + bias, for a user who trains it too:
    dW = dY^T x and dbias = Σ_tokens dY (plain GEMM and sum), None where not asked for."""
    return (grad_y.t().mm(x) if need_weight else None, grad_y.sum(0) if need_bias else None)


class DeclaredOp:
    """The two doors of one op (see the module docstring): `fwd` and `bwd` are the custom ops,
    `eager` the autograd Function's door; calling the op picks the door."""

    def __init__(self, name: str, *, forward: Callable, gradients: Callable, save: Callable,
                 fake: Callable, trained: tuple[str, ...], reads: dict[str, tuple[str, ...]],
                 differentiable_outputs: tuple[int, ...] = (0,), options: tuple[str, ...] = ("scaling",)):
        names = list(inspect.signature(forward).parameters)
        trained_index = tuple(names.index(n) for n in trained)
        trained_needs = operator.itemgetter(*trained_index)
        options_index, n_inputs = [names.index(n) for n in options], len(names)
        # The options as a tuple, by one C call (a comprehension costs ~0.3 us per call).
        options_of = (operator.itemgetter(*options_index) if len(options_index) > 1
                      else lambda inputs, i=options_index[0]: (inputs[i],))
        backward_names = list(inspect.signature(gradients).parameters)
        # The backward's fake: each gradient has its input's shape.
        shape_index = {n: backward_names.index(n) for n in trained if n != "x"}
        weight_index = backward_names.index("weight")
        only_y = differentiable_outputs == (0,)

        def differentiable(output):
            """What the op returns: its differentiable outputs (the others stay in the eager
            door's ctx: every output costs autograd bookkeeping per call)."""
            return output[0] if only_y else tuple(output[i] for i in differentiable_outputs)
        self.differentiable = differentiable

        def setup_context(ctx, inputs, output):
            ctx.options, ctx.backend = options_of(inputs), inputs[-1]
            ctx.save_for_backward(*save(inputs, output, ctx.needs_input_grad))

        def setup_custom_op_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            if not only_y:
                # The op's internals: autograd then hands backward no (zero) gradients for them.
                ctx.mark_non_differentiable(*(o for i, o in enumerate(output)
                                              if i not in differentiable_outputs))

        def backward_through(grads_of, custom_op: bool):
            """The autograd backward of either door; `grads_of` is `gradients` or the custom op,
            whose backward receives a gradient for every output (the eager door's: for the
            differentiable ones)."""
            def backward(ctx, *output_grads):
                if custom_op:
                    output_grads = [output_grads[i] for i in differentiable_outputs]
                result = [None] * n_inputs
                saved, needs = ctx.saved_tensors, ctx.needs_input_grad
                trained = trained_needs(needs)
                if any(trained):
                    grads = grads_of(*output_grads, *saved, *ctx.options, *trained, ctx.backend)
                    for i, need, g in zip(trained_index, trained, grads):
                        result[i] = g if need else None
                result[1], result[2] = base_layer_grads(output_grads[0], saved[0], *needs[1:3])
                return tuple(result)
            return backward

        # What each trained input's gradient reads of the saved tensors, by argument position:
        # a caller of the custom op may pass None for them (the eager door saves them itself).
        reads_index = [(n, need_at, [(s, backward_names.index(s)) for s in reads.get(n, ())])
                       for need_at, n in enumerate(trained, len(backward_names) - 1 - len(trained))]

        def gradients_or_empty(*args):
            for n, need_at, saved in reads_index:
                for saved_name, at in saved:
                    if args[need_at] and args[at] is None:
                        raise ValueError(f"{name}_bwd: the gradient of {n} was asked for but "
                                         f"{saved_name} is None")
            return tuple(g if g is not None else args[0].new_empty(0) for g in gradients(*args))

        # The custom op's schema: gradients' arguments, one tensor per trained input (empty
        # where not asked for: a custom op returns no None).
        gradients_or_empty.__signature__ = inspect.signature(gradients).replace(
            return_annotation=tuple[(Tensor,) * len(trained)])
        gradients_or_empty.__doc__ = gradients.__doc__

        def fake_gradients(*args):
            def like(n):  # x's gradient: tokens x in_features, in dY's dtype
                return ((args[0].shape[0], args[weight_index].shape[1]), args[0].dtype) if n == "x" \
                    else (args[shape_index[n]].shape, args[shape_index[n]].dtype)
            needs = args[-1 - len(trained):-1]
            # Each gradient in its input's dtype (fp32 adapters on a 16-bit x get fp32 ones).
            return tuple(args[0].new_empty(like(n)[0], dtype=like(n)[1]) if need
                         else args[0].new_empty(0) for n, need in zip(trained, needs))

        def forward_or_empty(*inputs):
            output = forward(*inputs)
            if any(o is None for o in output):  # the fake's empty tensor: a custom op returns no None
                output = tuple(f if o is None else o for o, f in zip(output, fake(*inputs)))
            return output

        forward_or_empty.__signature__ = inspect.signature(forward)
        forward_or_empty.__doc__ = forward.__doc__
        self.fwd = torch.library.custom_op(f"adapterops::{name}_fwd", forward_or_empty,
                                           mutates_args=())
        self.fwd.register_fake(fake)
        self.bwd = torch.library.custom_op(f"adapterops::{name}_bwd", gradients_or_empty,
                                           mutates_args=())
        self.bwd.register_fake(fake_gradients)
        self.fwd.register_autograd(backward_through(self.bwd, custom_op=True),
                                   setup_context=setup_custom_op_context)
        self.eager = eager_door(f"_Eager_{name}", forward, setup_context,
                                backward_through(gradients, custom_op=False), self.differentiable)

    def __call__(self, x: Tensor, *inputs):
        """The op's differentiable outputs (y alone, or a tuple starting with y), each (..., n)
        for x (..., in): the doors run on x flattened to 2-D. 2-D x gets y itself, not a view
        of it (FSDP2 warns on, and skips hooks for, view outputs)."""
        if x.dim() != 2:
            leading = x.shape[:-1]
            # An explicit token count: reshape(-1, 0) is ambiguous when in_features is 0.
            out = self(x.reshape(math.prod(leading), x.shape[-1]), *inputs)
            if isinstance(out, Tensor):
                return out.reshape(*leading, out.shape[-1])
            return tuple(o.reshape(*leading, o.shape[-1]) for o in out)
        if torch.compiler.is_compiling():
            return self.differentiable(self.fwd(x, *inputs))
        return self.eager(x, *inputs)


def eager_door(name: str, forward, setup_context, backward, leaving: Callable):
    """The eager door onto an op: a function of the op's inputs that runs them through a
    `torch.autograd.Function` (named `name`, kept as the function's `.function`): `forward`,
    then the same `setup_context` and `backward` its custom op registers (so both doors
    compute the same). Only `leaving(outputs)` leaves the Function. (A forward taking ctx: the
    separate setup_context form binds the arguments with `inspect` on every call, about 30 us.)

    The door calls the Function's C-level apply itself: the Python `Function.apply` in front
    of it costs about 5 us per call, for work only two cases need, both kept here. Under a
    functorch transform (vmap, grad, ...) it defers to `Function.apply`, which raises there,
    as these Functions define no vmap or jvp rule. Outside one, a tensor may still be a dead
    functorch wrapper (one that escaped a finished transform): it is unwrapped, as
    `Function.apply` does: through the wrapper itself, no gradient would reach the tensor it
    wraps."""
    def forward_with_context(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return leaving(output)

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward_with_context),
                     "backward": staticmethod(backward), "__doc__": eager_door.__doc__})
    # The C-level apply, bound to `function` (what `Function.apply` itself ends in).
    c_apply = super(torch.autograd.Function, function).apply
    transforms_active = torch._C._are_functorch_transforms_active
    unwrap_if_dead = torch._C._functorch.unwrap_if_dead

    def apply(*inputs):
        if transforms_active():
            return function.apply(*inputs)
        # functorch wraps into a plain Tensor (a Parameter's wrapper too), so only those can
        # be dead wrappers; `type(t) is Tensor` skips the parameters at a sixth of the cost
        # of isinstance.
        return c_apply(*[unwrap_if_dead(t) if type(t) is Tensor else t for t in inputs])

    apply.function = function
    return apply
