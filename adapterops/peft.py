"""PEFT interop: export to, load from and run PEFT LoRA models on adapterops' fused ops.

    adapterops.peft.export(model, "peft_dir")       # PeftModel.from_pretrained(base, "peft_dir")
    model = adapterops.peft.load(base, "peft_dir")  # a PEFT LoRA adapter into FusedLoRALinear
    left = adapterops.peft.fuse(peft_model)         # a PeftModel runs its LoRA on our ops
    adapterops.peft.fallbacks(peft_model)           # which calls still ran PEFT's forward, why

- `export(model, directory)`: a model with FusedLoRALinear / FusedLaMDALinear layers as a PEFT
  LoRA adapter (adapter_config.json and adapter_model.safetensors in PEFT's format) for the
  ORIGINAL base model. LoRA is exported as is; LaMDA as LoRA with B' = B S; the inits that
  rewrite W (PiSSA, LaMDA "svd") as the rank-2r LoRA of the same function on the original W,
  A' = [A; A0], B' = [B | -B0] (B S and B0 S0 for LaMDA), alpha doubled so that the scaling
  is unchanged (PEFT's own PiSSA conversion). Per-layer ranks and alphas go into PEFT's
  `rank_pattern` / `alpha_pattern`. HydraLoRA and HD-PiSSA layers have no PEFT LoRA form: a
  ValueError names them.
- `load(model, directory)`: a PEFT LoRA adapter (r, lora_alpha, target_modules, rank_pattern,
  alpha_pattern, use_rslora, fan_in_fan_out for Conv1D bases) into FusedLoRALinear layers of
  the base `model`, as `adapterops.load_adapters` does (all or nothing, the rest frozen). What
  it cannot represent (DoRA, bias other than "none", lora_bias, modules_to_save, other PEFT
  types) is a ValueError naming the option.
- `fuse(peft_model)`: makes every LoRA `Linear` of a PEFT model compute its forward and
  backward with `adapterops.lowrank_linear`, in place. PEFT's modules, parameter names,
  state_dict, save_pretrained / from_pretrained, merge_and_unload, disable_adapter and
  set_adapter keep working: only the layers' forward changes, and per call it falls back to
  PEFT's own forward whenever the fused op cannot give the same result (adapters disabled or
  merged, several active adapters, a DoRA or other variant, a lora_dropout that is not an
  nn.Dropout, a lora_B bias, a quantized base weight, mixed dtypes, extra forward arguments). PEFT's `lora_dropout`
  (an nn.Dropout on the adapter's input) runs fused, drawn in the kernels (`lowrank_linear`'s
  `dropout`): the same distribution, not PEFT's mask bit for bit. Returns {layer name:
  reason} for the LoRA layers it left on PEFT's path for good (not a Linear LoRA layer, DoRA,
  bias != "none", lora_bias, several active adapters) and for those whose configuration sends
  every call there (adapters in a dtype the op does not pair with the base weight's, outside
  autocast). PEFT's default fp32 adapters on a 16-bit base run fused, in fp32 as PEFT
  computes them. Under autocast a fused layer runs fused whatever its dtypes, as the op casts
  its inputs to the autocast dtype.
- `fallbacks(model)`: {layer name: {reason: calls}} of the fused layers' calls that ran PEFT's
  forward (adapters disabled or merged run the base layer alone, which is no fallback); the
  first call of a layer for a reason warns. An empty dict: every call ran fused.

Needs `peft` (and `safetensors` for files): `pip install peft`.
"""
import functools
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .modules.common import adapter_layers
from .modules import FusedLaMDALinear, FusedLoRALinear
from .modules.common import base_features, base_kind
from .ops import lowrank_linear
from .ops.checks import SIXTEEN_BIT, autocast_on
from .pissa import factor_dtype
from .saving import install, optional_import, safetensors_module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _peft():
    return optional_import("peft", "adapterops.peft needs PEFT")


def _lora_form(layer) -> tuple[Tensor, Tensor, int, float]:
    """(A', B', r', s) of the PEFT LoRA computing the same function on the ORIGINAL base weight
    (see the module docstring)."""
    dtype = factor_dtype(layer.weight)
    A = layer.lora_A.detach().to(dtype)
    B = layer.lora_B.detach().to(dtype)
    if layer.lora_S is not None:
        B = B @ layer.lora_S.detach().to(dtype)
    if layer.rewrites_weight:
        B0 = layer.lora_B0.to(dtype)
        if layer.lora_S0 is not None:
            B0 = B0 @ layer.lora_S0.to(dtype)
        A, B = torch.cat([A, layer.lora_A0.to(dtype)], 0), torch.cat([B, -B0], 1)
    return A.to(layer.weight.dtype), B.to(layer.weight.dtype), A.shape[0], layer.scaling


def export(model: nn.Module, directory: Union[str, Path]) -> None:
    """Writes the model's LoRA, PiSSA and LaMDA layers as a PEFT LoRA adapter for the original
    base model (see the module docstring)."""
    peft = _peft()
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export: the model has no adapterops adapter layer")
    other = [f"{name} ({type(layer).__name__})" for name, layer in layers
             if not isinstance(layer, (FusedLoRALinear, FusedLaMDALinear))]
    if other:
        raise ValueError(f"export: these layers have no PEFT LoRA form: {', '.join(other)}")
    kinds = {layer.base_kind for _, layer in layers}
    if len(kinds) > 1:
        raise ValueError("export: PEFT's fan_in_fan_out is one flag per adapter, and these "
                         "layers mix nn.Linear and Conv1D bases")
    forms = {name: _lora_form(layer) for name, layer in layers}
    # The most common (rank, alpha) is the config's; the others go into PEFT's patterns.
    r, alpha = Counter((rank, scaling * rank) for _, _, rank, scaling in forms.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(name): rank for name, (_, _, rank, _) in forms.items() if rank != r}
    alpha_pattern = {re.escape(name): scaling * rank for name, (_, _, rank, scaling) in forms.items()
                     if scaling * rank != alpha}
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(forms),
                             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                             fan_in_fan_out=kinds == {"conv1d"}, bias="none", lora_dropout=0.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (A, B, _, _) in forms.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.to("cpu", copy=True).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.to("cpu", copy=True).contiguous()
    safetensors_module().save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of the
    module's name at a component boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# PEFT LoRA options `load` cannot represent, with the value that means "off".
_UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
                "layers_to_transform": None, "target_parameters": None}


def load(model: nn.Module, directory: Union[str, Path], backend=None) -> nn.Module:
    """Loads a PEFT LoRA adapter directory into FusedLoRALinear layers of `model` (the base
    model it was trained on); returns the model. See the module docstring."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"peft.load: no {CONFIG_FILE} in {directory}")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft.load: {path} is a {config.get('peft_type')!r} adapter, not LORA"
                         + (" (an adapterops directory: use adapterops.load_adapters)"
                            if config.get("format") == "adapterops" else ""))
    unsupported = [f"{key}={config[key]!r}" for key, off in _UNSUPPORTED.items()
                   if config.get(key, off) not in (off, [], {})]
    if unsupported:
        raise ValueError(f"peft.load: adapterops' LoRA layers cannot represent "
                         f"{', '.join(unsupported)}")
    tensors = safetensors_module().load_file(str(Path(directory) / WEIGHTS_FILE))
    names = sorted({key[len(PREFIX):].rsplit(".", 2)[0] for key in tensors
                    if key.startswith(PREFIX)})
    expected = {f"{PREFIX}{name}.lora_{ab}.weight" for name in names for ab in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    modules = dict(model.named_modules())
    absent = [name for name in names if name not in modules]
    if missing or unexpected or absent or not names:
        raise ValueError(f"peft.load: {WEIGHTS_FILE} does not match the model or itself: "
                         f"layers not in the model {absent or 'none'}; missing tensors "
                         f"{missing or 'none'}; unexpected tensors {unexpected or 'none'}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    layers = []
    for name in names:
        A, B = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        rank = _pattern_value(rank_pattern, name, config["r"])
        lora_alpha = _pattern_value(alpha_pattern, name, config["lora_alpha"])
        module = modules[name]
        try:
            in_features, out_features = base_features(module)
        except TypeError as exc:
            raise ValueError(f"peft.load: layer {name}: {exc}") from None
        if A.shape != (rank, in_features) or B.shape != (out_features, rank):
            raise ValueError(f"peft.load: layer {name}: lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)} do not fit rank {rank} on a {in_features} -> "
                             f"{out_features} {base_kind(module)} layer")
        scaling = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        # Our layers' scaling is alpha / rank: pass the alpha that gives PEFT's scaling.
        layer = FusedLoRALinear.from_linear(module, rank, scaling * rank, backend=backend,
                                            initialise=False)
        layer.load_adapter_state({"lora_A": A, "lora_B": B}, name)
        layers.append((name, layer))
    # One AdapterConfig describes the layers only when they share PEFT's rank and scaling.
    uniform = (not rank_pattern and not alpha_pattern and not config.get("use_rslora"))
    install(model, layers, AdapterConfig(method="lora", rank=config["r"],
                                         alpha=config["lora_alpha"], target_modules=names,
                                         backend=backend) if uniform else None)
    return model


def _static_reason(layer, lora_linear_cls, configs: dict) -> Union[str, None]:
    """Why a PEFT LoRA layer can never run on the fused op, or None (`configs`: the PEFT
    model's adapter name -> LoraConfig)."""
    if type(layer) is not lora_linear_cls:
        return f"{type(layer).__name__}, not PEFT's LoRA Linear"
    try:
        base_kind(layer.base_layer)
    except TypeError:
        return f"its base layer is a {type(layer.base_layer).__name__}"
    if len(layer.active_adapters) != 1:
        return f"{len(layer.active_adapters)} active adapters"
    adapter = layer.active_adapters[0]
    if layer.use_dora.get(adapter) or adapter in getattr(layer, "lora_variant", {}):
        return "DoRA (or another LoRA variant)"
    if layer.lora_bias.get(adapter):
        return "lora_bias"
    bias = getattr(configs.get(adapter), "bias", "none")
    if bias != "none":
        return f"bias={bias!r}"
    return None


def _fallback_reason(layer, x: Tensor, args, kwargs) -> Optional[str]:
    """Why this call of a fused PEFT LoRA Linear runs PEFT's forward, or None when it runs on
    `lowrank_linear`. Adapters disabled or merged are not fallbacks: the base layer alone is
    what PEFT runs then, and all there is to run."""
    if args or kwargs:
        return "extra forward arguments"
    if len(layer.active_adapters) != 1:
        return f"{len(layer.active_adapters)} active adapters"
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A:
        return f"no LoRA weights for the active adapter {adapter!r}"
    if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter):
        return "DoRA (or another LoRA variant)"
    if layer.lora_bias.get(adapter):
        return "lora_bias"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout) and dropout.training:
        return f"lora_dropout is a {type(dropout).__name__}, not nn.Dropout, in training"
    weight, lora_A, lora_B = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not weight.is_floating_point():
        return _quantized_base(weight)
    # Under autocast the op casts x, W, A and B to the autocast dtype, as PEFT's F.linear calls do.
    if not (_served_dtypes(x.dtype, weight, lora_A, lora_B) or autocast_on(x)):
        return (f"mixed dtypes (x {x.dtype}, weight {weight.dtype}, lora_A {lora_A.dtype}, "
                f"lora_B {lora_B.dtype})")
    if x.device != weight.device:
        return f"x on {x.device}, weight on {weight.device}"
    return None


def _served_dtypes(x_dtype: torch.dtype, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether `lowrank_linear` takes these dtypes as PEFT computes with them: x in the base
    weight's dtype, the adapter in it too, or in fp32 on a 16-bit base (PEFT's default,
    `autocast_adapter_dtype=True`: PEFT casts x to fp32 for the adapter, as the op does)."""
    adapter = lora_A.dtype
    return (x_dtype == weight.dtype and lora_B.dtype == adapter
            and (adapter == weight.dtype or (adapter == torch.float32 and weight.dtype in SIXTEEN_BIT)))


def _fused_forward(layer, name: str, x: Tensor, *args, **kwargs) -> Tensor:
    """A PEFT LoRA Linear's forward on `lowrank_linear`, or PEFT's own where they would differ:
    each such call is counted per reason (`fallbacks`), the first of a reason warns."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    reason = _fallback_reason(layer, x, args, kwargs)
    if reason is not None:
        counts = layer.__dict__.setdefault(_FALLBACKS, Counter())
        if not counts[reason]:
            warnings.warn(f"adapterops.peft.fuse: {name or 'the model'} runs PEFT's forward, not "
                          f"the fused op: {reason} (adapterops.peft.fallbacks(model) counts "
                          "these calls)", stacklevel=3)
        counts[reason] += 1
        return type(layer).forward(layer, x, *args, **kwargs)
    adapter = layer.active_adapters[0]
    base = layer.base_layer
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    dropout = layer.lora_dropout[adapter]
    # PEFT's nn.Dropout on the adapter's input, fused: drawn in the kernels, in training only.
    p = dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0
    return lowrank_linear(x, weight, base.bias, layer.lora_A[adapter].weight,
                          layer.lora_B[adapter].weight, layer.scaling[adapter], dropout=p)


# The attribute of a fused PEFT layer that counts its fallbacks by reason.
_FALLBACKS = "_adapterops_fallbacks"


def fallbacks(model: nn.Module) -> dict[str, dict[str, int]]:
    """{layer name: {reason: calls}} for every layer `fuse` served whose calls ran PEFT's
    forward instead of the fused op (an empty dict: every call ran fused)."""
    return {name: dict(module.__dict__[_FALLBACKS]) for name, module in model.named_modules()
            if module.__dict__.get(_FALLBACKS)}


def _quantized_base(weight) -> str:
    """The reason for a base layer whose weight is not floating point: a bitsandbytes 4-bit or
    8-bit layer, which PEFT's forward runs and the fused op does not read (not even under
    autocast: it would take the packed bytes for weights)."""
    return (f"a quantized base weight ({type(weight).__name__}, {weight.dtype}): adapterops does "
            "not serve quantized bases yet")


def _every_call_reason(layer) -> Optional[str]:
    """Why a fused layer's configuration sends every call (or every training call) to PEFT's
    forward, or None. fuse reports these with the layers it leaves."""
    adapter = layer.active_adapters[0]
    weight, lora_A, lora_B = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not weight.is_floating_point():
        return f"{_quantized_base(weight)}: every call runs PEFT's forward"
    if not _served_dtypes(weight.dtype, weight, lora_A, lora_B):
        return (f"mixed dtypes (weight {weight.dtype}, lora_A {lora_A.dtype}, lora_B "
                f"{lora_B.dtype}): every call outside autocast runs PEFT's forward")
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return (f"lora_dropout is a {type(dropout).__name__}, not nn.Dropout: every training "
                "call runs PEFT's forward")
    return None


def fuse(peft_model: nn.Module) -> dict[str, str]:
    """Makes the PEFT model's LoRA Linear layers run on adapterops' fused op, in place; returns
    {layer name: reason} for the LoRA layers left on PEFT's path, for good or (given their
    configuration) on every call or every training call. See the module docstring."""
    _peft()
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    configs = getattr(peft_model, "peft_config", {})
    left = {}
    found = False
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        found = True
        reason = _static_reason(layer, LoraLinear, configs)
        if reason is not None:
            left[name] = reason
            continue
        layer.forward = functools.partial(_fused_forward, layer, name)
        reason = _every_call_reason(layer)
        if reason is not None:
            left[name] = reason
    if not found:
        raise ValueError("fuse: the model has no PEFT LoRA layer")
    return left
