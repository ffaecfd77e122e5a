"""What the adapter modules share: the `AdapterLayer` protocol, their hyper-parameter checks,
the frozen base layer, and the zero gradient of a parameter frozen without `requires_grad=False`."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import dispatch
from ..ops.checks import SIXTEEN_BIT


def check_layer_args(*, dropout: float, alpha: float, **positive_ints) -> None:
    """ValueError, naming the argument, unless every `positive_ints` value is an int >= 1,
    alpha is finite and non-zero, and dropout is in [0, 1)."""
    for name, value in positive_ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha must be a finite non-zero number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def frozen_base(in_features: int, out_features: int, bias: bool, device=None,
                dtype=None) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """(weight, bias) of the frozen base layer, initialised as nn.Linear initialises them
    (`from_linear` then copies a real layer's)."""
    weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                          requires_grad=False)
    bias_parameter = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                   requires_grad=False) if bias else None)
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias_parameter is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(bias_parameter, -bound, bound)
    return weight, bias_parameter


def module_tensors(module: nn.Module, *names: str) -> list:
    """[getattr(module, name) for name in names], a registered parameter read straight from
    `module._parameters`: the forward's hot path, where nn.Module.__getattr__ (the way to a
    parameter) costs about 0.8 us per name and call. Anything not registered there (a None
    kept as a plain attribute, a parametrized weight, a buffer) goes through getattr."""
    registered = module._parameters
    return [registered[name] if name in registered else getattr(module, name) for name in names]


class _Required:
    """The default of an adapter option that has none (`OPTIONS` of the module classes)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


def is_conv1d(module) -> bool:
    """transformers' `Conv1D` (GPT-2 and kin): a linear layer with weight (in, out), y = x W + b.
    Recognised without importing transformers (a model holding one has imported it)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def base_kind(linear) -> str:
    """"linear" for an nn.Linear (or subclass), "conv1d" for transformers' Conv1D; TypeError
    for anything else."""
    if isinstance(linear, nn.Linear):
        return "linear"
    if is_conv1d(linear):
        return "conv1d"
    raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got "
                    f"{type(linear).__name__}")


def base_features(linear) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if base_kind(linear) == "conv1d":
        return linear.weight.shape[0], linear.weight.shape[1]
    return linear.in_features, linear.out_features


def check_linear(linear, trains_weight: bool = False) -> None:
    """TypeError unless `linear` is an nn.Linear or a Conv1D with a floating-point weight. A
    quantized base (bitsandbytes' Linear4bit / Linear8bitLt hold uint8 / int8 weights) is named
    as such: the fused adapters read a dense W (quantized bases are not served yet), and a
    method that trains W itself (`trains_weight`, HD-PiSSA) can never take one."""
    base_kind(linear)
    weight = linear.weight
    if not weight.is_floating_point():
        in_features, out_features = base_features(linear)
        what = (f"a {type(linear).__name__} with a {weight.dtype} weight of {weight.numel()} "
                f"elements for {out_features} x {in_features}: a quantized base")
        if trains_weight:
            raise TypeError(f"{what}; HD-PiSSA trains W itself and cannot train a quantized "
                            "weight: convert a model in fp32, fp16 or bf16")
        raise TypeError(f"{what}; adapterops' fused adapters take a floating-point base weight "
                        "(fp32, fp16, bf16): 4-bit and 8-bit bitsandbytes bases are not served "
                        "yet (PEFT's QLoRA layers run them)")


@torch.no_grad()
def copy_base(layer: nn.Module, linear) -> None:
    """Copies `linear`'s weight (as out x in) and bias into `layer`'s frozen base and records
    its kind (`layer.base_kind`, for merging back); linear is left untouched."""
    layer.base_kind = base_kind(linear)
    layer.weight.copy_(linear.weight.t() if layer.base_kind == "conv1d" else linear.weight)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)


def make_base(kind: str, weight: Tensor, bias: Optional[Tensor]) -> nn.Module:
    """A plain layer of `kind` ("linear" or "conv1d") computing x weight^T + bias, holding
    copies of weight (out x in) and bias."""
    out_features, in_features = weight.shape
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.detach().t().clone())
        # Conv1D always adds its bias (torch.addmm): a layer without one gets zeros.
        layer.bias = nn.Parameter(bias.detach().clone() if bias is not None
                                  else weight.new_zeros(out_features))
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def check_adapter_state(layer_name: str, expected: dict[str, Tensor], state: dict) -> None:
    """ValueError naming every missing and unexpected key of `state` and every tensor whose
    shape differs from `expected`'s (the layer's own tensors)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{name}: {tuple(state[name].shape)} where the layer has {tuple(t.shape)}"
              for name, t in expected.items() if name in state and state[name].shape != t.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{layer_name}: adapter state does not match the layer: missing "
                         f"{missing or 'none'}, unexpected {unexpected or 'none'}"
                         + (f", shapes: {'; '.join(shapes)}" if shapes else ""))


DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def resolve_adapter_dtype(adapter_dtype, base_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The adapter's dtype on a base of `base_dtype` (None: torch's default dtype):
    `adapter_dtype` when given (a torch dtype or its name, "float32"), else fp32 on a 16-bit
    base, as PEFT keeps it (the optimizer then updates fp32 adapters with no master copy), and
    the base's dtype otherwise. The fused ops take the adapter in the base's dtype, or in fp32
    on a 16-bit base: anything else is a ValueError naming both."""
    base = base_dtype or torch.get_default_dtype()
    if adapter_dtype is None:
        return torch.float32 if base in SIXTEEN_BIT else base
    dtype = DTYPE_NAMES.get(adapter_dtype.removeprefix("torch.")) if isinstance(adapter_dtype, str) else adapter_dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"adapter_dtype must be None, a torch dtype or one of "
                         f"{', '.join(DTYPE_NAMES)}, got {adapter_dtype!r}")
    if dtype != base and not (dtype == torch.float32 and base in SIXTEEN_BIT):
        raise ValueError(f"adapter_dtype {dtype} on a {base} base: the adapter takes the base's "
                         "dtype, or float32 on a float16 or bfloat16 base")
    return dtype


class AdapterLayer(nn.Module):
    """What the model-level API (config, inject, saving, peft) asks of every adapter layer: the
    attributes and hooks below, and the frozen base `weight` (out x in), `bias` (or None),
    `in_features`, `out_features`, which save_adapters records for load_adapters to check."""

    method: str = ""                 # the AdapterConfig method the class serves (config.METHODS)
    OPTIONS: dict = {}               # the AdapterConfig fields it takes, with defaults (or REQUIRED)
    mergeable: bool = True           # `merge` works: merge_and_unload replaces the layer
    can_disable: bool = True         # `base_forward` works: disable_adapters may switch to it
    base_kind: str = "linear"        # what `merge` gives back, "linear" or "conv1d" (copy_base sets it)
    adapters_disabled: bool = False  # set by disable_adapters: forward runs `base_forward`

    def _init_base(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool,
                   backend: Optional[str], device, dtype, adapter_dtype=None) -> dict:
        """What every layer's __init__ sets after its own checks: the sizes, alpha and scaling
        = alpha / rank, the backend (checked), the frozen base (in `dtype`) and lora_A (rank x
        in, empty, in `adapter_dtype`, None: the base's). Returns the factory arguments for the
        rest of the adapter."""
        dispatch.check_backend_name(backend)
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.scaling, self.backend = alpha / rank, backend
        self.weight, self.bias = frozen_base(in_features, out_features, bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": adapter_dtype or self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        return factory

    @classmethod
    def from_linear(cls, linear, *args, **kwargs) -> "AdapterLayer":
        """The layer on a copy of `linear`; load_adapters calls `from_linear(linear,
        **layer_options(), backend=..., initialise=False)`, then `load_adapter_state`."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_linear")

    @classmethod
    def from_config(cls, linear, config, *, initialise: bool = True) -> "AdapterLayer":
        """`from_linear` with the rank, alpha, options and backend of an `AdapterConfig` (`inject`)."""
        return cls.from_linear(linear, config.rank, alpha=config.alpha, backend=config.backend,
                               initialise=initialise, **config.options_for(cls))

    def layer_options(self) -> dict:
        """What `from_linear` needs to rebuild this layer (saved per layer by save_adapters)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement layer_options")

    def adapter_state(self) -> dict[str, Tensor]:
        """The tensors an adapter file holds: every state_dict entry but the frozen base."""
        return {name: t for name, t in self.state_dict().items() if name not in ("weight", "bias")}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor], layer_name: str = "layer") -> None:
        """Copies `adapter_state()`'s tensors into a layer built by `from_linear(...,
        initialise=False)`; ValueError (`check_adapter_state`) unless they match its own."""
        check_adapter_state(layer_name, self.adapter_state(), state)
        for name, tensor in state.items():
            getattr(self, name).copy_(tensor)

    @torch.no_grad()
    def load_trained_state(self, state: dict[str, Tensor], layer_name: str = "layer") -> None:
        """Loads a trained layer's whole `state_dict()`, its base weight as the layer held it
        included (`adapterops.save_pretrained`'s checkpoint), into a layer built by
        `from_linear(..., initialise=False)`; ValueError unless the keys and shapes match."""
        check_adapter_state(layer_name, self.state_dict(), state)
        self.load_state_dict(state)

    def merge(self) -> nn.Module:
        """A plain layer of `base_kind` computing the same function (merge_and_unload)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement merge")

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer alone: the forward while `adapters_disabled`."""
        return nn.functional.linear(x, self.weight, self.bias)


class _ZeroGradientFor(torch.autograd.Function):
    """x unchanged; in backward, x's gradient passes through and `parameter` gets zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, parameter: Tensor) -> Tensor:
        ctx.shape, ctx.dtype, ctx.device = parameter.shape, parameter.dtype, parameter.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        return grad_x, torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


def zero_gradient_for(x: Tensor, parameter: Tensor) -> Tensor:
    """x, with a backward that gives `parameter` a zero gradient (when it requires one).

    For a parameter frozen while it keeps `requires_grad=True`: DDP and FSDP expect a gradient
    for every parameter they registered as trainable (a parameter that stops getting one makes
    DDP's reducer fail or skip the bucket it shares with others), while the computation that
    uses the parameter is given a detached copy, so it computes no gradient for it."""
    if not (parameter.requires_grad and torch.is_grad_enabled()):
        return x
    return _ZeroGradientFor.apply(x, parameter)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(qualified name, layer) of every adapterops adapter layer in `model`, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, AdapterLayer)]


def is_base_layer(module: nn.Module) -> bool:
    """Whether an adapter layer can replace `module`: an nn.Linear (or subclass) or a
    transformers Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
