"""Adapters in a whole model: inject, count, merge, disable.

    model = adapterops.inject(model, adapterops.AdapterConfig(method="lora", rank=8, alpha=16,
                                                              target_modules=["q_proj", "v_proj"]))
    trainable, total = adapterops.trainable_parameters(model)
    with adapterops.disable_adapters(model):
        base_logits = model(ids).logits                  # the base model
    model = adapterops.merge_and_unload(model)           # plain nn.Linear layers again

`inject` replaces, in place, every matching `nn.Linear` (subclasses too) and transformers
`Conv1D` with the config's adapter layer (each built from the layer it replaces, which it
copies), all or nothing, and freezes every other parameter of the model, as PEFT does. With
`target_modules=None` ("all-linear") it takes every linear layer except the model's output
embeddings (a transformers model's `get_output_embeddings()`, often tied to the input
embeddings) and the output projection of an `nn.MultiheadAttention`, whose forward does not
call it: PEFT's "all-linear" rule. A model that is a transformers model gets its own
`save_pretrained` while adapter layers remain: `adapterops.save_pretrained` (adapterops.saving),
a full checkpoint plus the adapter directory, which the HF Trainer resumes from and
`adapterops.load_pretrained` loads, and which the plain class's `from_pretrained` refuses (it
would load the model without its adapters: for PiSSA and LaMDA "svd", with the residual weight).
After `merge_and_unload` the model's own `save_pretrained` is back.
"""
import contextlib
from collections.abc import Iterator

from torch import nn

from .config import AdapterConfig, matches
from .modules.common import adapter_layers, is_base_layer
from .saving import install


def _excluded_from_all_linear(model: nn.Module) -> set[int]:
    """ids of the linear layers target_modules=None leaves alone (see the module docstring)."""
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        output = get_output()
        if isinstance(output, nn.Module):
            excluded.add(id(output))
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            excluded.add(id(module.out_proj))
    return excluded


def find_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the linear layers `target_modules` selects (PEFT's rule, see
    `adapterops.config.matches`); ValueError for a selected module that is not a linear layer
    or that an adapter cannot replace."""
    excluded = _excluded_from_all_linear(model) if target_modules in (None, "all-linear") else set()
    inside_adapter = {id(sub) for _, layer in adapter_layers(model) for sub in layer.modules()}
    chosen, unsupported = [], []
    for name, module in model.named_modules():
        if not name or id(module) in inside_adapter or not matches(name, target_modules):
            continue
        if is_base_layer(module):
            if id(module) not in excluded:
                chosen.append((name, module))
        elif target_modules not in (None, "all-linear"):
            unsupported.append(f"{name} ({type(module).__name__})")
    explicit_mha = [name for name, module in chosen
                    if any(isinstance(parent, nn.MultiheadAttention) and parent.out_proj is module
                           for parent in model.modules())]
    if unsupported or explicit_mha:
        raise ValueError("target_modules selects modules an adapter cannot replace: "
                         + ", ".join(unsupported + [f"{n} (the output projection of an "
                                                    "nn.MultiheadAttention)" for n in explicit_mha])
                         + "; adapters replace nn.Linear and transformers Conv1D layers")
    return chosen


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replaces the linear layers `config.target_modules` selects with `config.method`'s
    adapter layer, in place, all or nothing, and freezes every other parameter; returns the
    model. See the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject: config must be an adapterops.AdapterConfig, got "
                        f"{type(config).__name__}")
    targets = find_targets(model, config.target_modules)
    if not targets:
        linear = [name for name, m in model.named_modules() if name and is_base_layer(m)]
        raise ValueError(f"inject: no nn.Linear or Conv1D in the model matches target_modules="
                         f"{config.target_modules!r}; its linear layers: "
                         f"{', '.join(linear[:12]) or 'none'}{' ...' if len(linear) > 12 else ''}")
    cls = config.layer_class
    # Every layer is built before any is swapped in: one that cannot be built leaves the model
    # untouched, and the error names it.
    replacements = []
    for name, module in targets:
        try:
            replacements.append((name, cls.from_config(module, config)))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"inject: layer {name}: {exc}") from exc
    install(model, replacements, config)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (elements; shared parameters counted once)."""
    parameters = list(model.parameters())
    return (sum(p.numel() for p in parameters if p.requires_grad),
            sum(p.numel() for p in parameters))


def merge_and_unload(model: nn.Module, skip_unmergeable: bool = False) -> nn.Module:
    """Replaces every adapter layer by a plain `nn.Linear` (or `Conv1D`, for a layer made from
    one) computing the same function, its parameters frozen as the base layer's were (LoRA,
    PiSSA, LaMDA: W + s B S A; HD-PiSSA: its trained W). HydraLoRA layers cannot merge (their
    gates depend on the token): a ValueError names them, unless `skip_unmergeable=True`, which
    leaves them in place. Returns the model (the merged layer when `model` is an adapter layer
    itself)."""
    layers = adapter_layers(model)
    unmergeable = [name or "(the model itself)" for name, layer in layers if not layer.mergeable]
    if unmergeable and not skip_unmergeable:
        raise ValueError(f"merge_and_unload: these layers cannot be merged (HydraLoRA's gates "
                         f"depend on the token): {', '.join(unmergeable)}; pass "
                         "skip_unmergeable=True to keep them and merge the rest")
    merged_root = None
    for name, layer in layers:
        if not layer.mergeable:
            continue
        merged = layer.merge()
        merged.requires_grad_(False)
        if name:
            model.set_submodule(name, merged)
        else:
            merged_root = merged
    if merged_root is not None:
        return merged_root
    if not adapter_layers(model) and "save_pretrained" in vars(model):
        del model.save_pretrained  # nothing left to lose: the model's own method again
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapter layer computes its base layer alone (the original W for
    PiSSA and LaMDA "svd", from the initial factors they keep). HD-PiSSA layers train W itself
    and keep no original: a ValueError names them before anything changes."""
    layers = adapter_layers(model)
    refused = [name or "(the model itself)" for name, layer in layers if not layer.can_disable]
    if refused:
        raise ValueError(f"disable_adapters: these layers keep no base weight to fall back to "
                         f"(HD-PiSSA trains W itself): {', '.join(refused)}")
    previous = [layer.adapters_disabled for _, layer in layers]
    for _, layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for (_, layer), state in zip(layers, previous):
            layer.adapters_disabled = state
