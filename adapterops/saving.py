"""Adapter directories: `save_adapters(model, directory)` and `load_adapters(model, directory)`.

    adapterops.save_adapters(model, "out/")                       # after training
    model = adapterops.load_adapters(base_model, "out/")          # the original base model

A directory holds `adapter_config.json` and `adapter_model.safetensors`, with only what the
adapters need: for each adapter layer its method, kind (nn.Linear or Conv1D), sizes and
options (rank, alpha, init, ...), and its adapter tensors (`layer.adapter_state()`): the
factors; for PiSSA and LaMDA "svd" also the initial factors, from which the residual base
weight is rebuilt exactly (`adapterops.pissa.residual_weight`); for HD-PiSSA, which trains W
itself, the trained weight (and its fp32 master copy) and every rank's factors. Applied to the
original base model, a directory reproduces the trained model's outputs: bit for bit on the
same device and dtype.

`load_adapters` injects into the base model as `inject` does (all or nothing, every other
parameter frozen) and raises, before changing the model, naming every layer that is missing or
does not match, and every missing or unexpected tensor. The files need `safetensors`
(`pip install safetensors`). A PEFT adapter directory is read by `adapterops.peft.load`.
"""
import importlib
import json
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .config import METHODS, AdapterConfig
from .inject import _is_base_layer, adapter_layers, install
from .modules.common import base_features, base_kind

FORMAT = "adapterops"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def optional_import(module: str, why: str):
    """`module`, imported; ImportError saying why it is needed and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{why}: pip install {module.split('.')[0]}") from exc


def safetensors_module():
    return optional_import("safetensors.torch", "adapter files are safetensors files")


def _key(layer_name: str, tensor_name: str) -> str:
    return f"{layer_name}.{tensor_name}" if layer_name else tensor_name


def save_adapters(model: nn.Module, directory: Union[str, Path]) -> None:
    """Writes `directory`/adapter_config.json and adapter_model.safetensors (see the module
    docstring); ValueError when the model has no adapter layer."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_adapters: the model has no adapterops adapter layer "
                         "(adapterops.inject adds them)")
    from . import __version__
    config = getattr(model, "adapterops_config", None)
    description = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "adapterops_version": __version__,
        "config": config.to_dict() if isinstance(config, AdapterConfig) else None,
        "layers": {name: {"method": layer.method, "base": layer.base_kind,
                          "in_features": layer.in_features, "out_features": layer.out_features,
                          "bias": layer.bias is not None, "options": layer.layer_options()}
                   for name, layer in layers}}
    tensors = {_key(name, key): t.detach().to("cpu", copy=True).contiguous()
               for name, layer in layers for key, t in layer.adapter_state().items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors_module().save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def read_description(directory: Union[str, Path]) -> dict:
    """The parsed adapter_config.json of an adapterops directory; ValueError for a missing
    file, a PEFT adapter or another format."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"load_adapters: no {CONFIG_FILE} in {directory}")
    description = json.loads(path.read_text())
    if description.get("format") != FORMAT:
        hint = (" (a PEFT adapter: load it with adapterops.peft.load)"
                if "peft_type" in description else "")
        raise ValueError(f"load_adapters: {path} is not an adapterops adapter directory{hint}")
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_adapters: {path} has format version "
                         f"{description.get('format_version')!r}; this adapterops reads "
                         f"{FORMAT_VERSION}")
    return description


def _check_base(name: str, module: Optional[nn.Module], entry: dict) -> Optional[str]:
    """Why the model's layer `name` cannot take the saved adapter `entry`, or None."""
    if module is None:
        return f"{name}: not in the model"
    if not _is_base_layer(module):
        return f"{name}: a {type(module).__name__}, not an nn.Linear or Conv1D"
    in_features, out_features = base_features(module)
    found = (base_kind(module), in_features, out_features, module.bias is not None)
    saved = (entry["base"], entry["in_features"], entry["out_features"], entry["bias"])
    if found != saved:
        return (f"{name}: the model has (kind, in, out, bias) = {found}, the adapter was saved "
                f"for {saved}")
    return None


def load_adapters(model: nn.Module, directory: Union[str, Path],
                  backend: Optional[str] = None) -> nn.Module:
    """Injects the saved adapters into `model` (the original base model) and loads their
    tensors; returns the model. See the module docstring. `backend` is the new layers'
    backend (None: dispatch picks)."""
    description = read_description(directory)
    entries = description["layers"]
    unknown = sorted({entry["method"] for entry in entries.values()} - set(METHODS))
    if unknown:
        raise ValueError(f"load_adapters: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    modules = dict(model.named_modules())
    problems = [p for name, entry in entries.items()
                if (p := _check_base(name, modules.get(name), entry)) is not None]
    if problems:
        raise ValueError("load_adapters: the model does not match the adapter: "
                         + "; ".join(problems))
    tensors = safetensors_module().load_file(str(Path(directory) / WEIGHTS_FILE))
    layers = {}
    for name, entry in entries.items():
        layers[name] = METHODS[entry["method"]].from_linear(
            modules[name], **entry["options"], backend=backend, initialise=False)
    expected = {_key(name, key) for name, layer in layers.items() for key in layer.adapter_state()}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"load_adapters: {WEIGHTS_FILE} does not match {CONFIG_FILE}: missing "
                         f"{missing or 'none'}; unexpected {unexpected or 'none'}")
    for name, layer in layers.items():
        layer.load_adapter_state({key: tensors[_key(name, key)] for key in layer.adapter_state()},
                                 name)
    config = description.get("config")
    install(model, list(layers.items()),
            AdapterConfig.from_dict(config) if config is not None else None)
    return model

