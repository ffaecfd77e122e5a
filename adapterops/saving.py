"""Adapter directories (`save_adapters`, `load_adapters`), whole-model checkpoints of a
transformers model with adapters (`save_pretrained`, `load_pretrained`), and `install`, which
puts built adapter layers into a model for `inject` and the loaders (and gives a transformers
model this module's `save_pretrained`).

    adapterops.save_adapters(model, "out/")                       # after training
    model = adapterops.load_adapters(base_model, "out/")          # the original base model

    model.save_pretrained("ckpt/")       # an injected transformers model (the Trainer does this)
    model = adapterops.load_pretrained("ckpt/")                   # the trained model, as saved

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

`save_pretrained` (what a transformers model with adapter layers runs as `model.save_pretrained`,
so the HF `Trainer`'s checkpoints and `save_model` too) writes a directory that is both:
- the model's own full checkpoint (`config.json`, `model.safetensors`, the generation config),
  with every tensor of the injected model under its state_dict name: the base weights as the
  adapter layers hold them (a residual for PiSSA and LaMDA "svd", the trained W for HD-PiSSA),
  the adapter tensors beside them. The Trainer resumes from it (`load_state_dict` of the
  injected model) exactly, and `load_pretrained(directory)` rebuilds the trained model from it
  alone;
- an adapter directory (`adapter_config.json`, `adapter_model.safetensors`), which
  `load_adapters(original_base_model, directory)` reads.

Why a full checkpoint, not the adapters alone (PEFT's choice): the Trainer resumes into the
model it trains, and for PiSSA, LaMDA "svd" and HD-PiSSA that model's base weight is not the
base model's; a full checkpoint restores it bit for bit whatever rebuilt the model. The price
is disk: each checkpoint holds the whole model (`save_total_limit` bounds how many are kept).

The plain class's `from_pretrained` on such a directory would build the model without its
adapter layers and, for PiSSA and LaMDA "svd", take the residual for the base weight: a
different model, silently. So `config.json` carries `transformers_weights` (the config field
that names the weights file) set to a sentence naming `load_pretrained`, which no
`from_pretrained` accepts: it raises a ValueError quoting it before loading anything.
`AutoConfig.from_pretrained` still reads the config.
"""
import importlib
import json
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .config import METHODS, AdapterConfig
from .modules.common import AdapterLayer, adapter_layers, base_features, base_kind, is_base_layer

FORMAT = "adapterops"
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
# transformers' from_pretrained refuses a `transformers_weights` that names no safetensors file
# and quotes it in its error: this sentence is what a user of the plain class reads.
PLAIN_LOAD_REFUSAL = (
    "not loadable by from_pretrained: this directory holds a model with adapterops adapter "
    "layers (adapter_config.json), which from_pretrained would load without them; load it with "
    "adapterops.load_pretrained(directory), or apply its adapters to the original base model "
    "with adapterops.load_adapters(base_model, directory)")
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
    if not is_base_layer(module):
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



def save_pretrained(model: nn.Module, directory: Union[str, Path], **kwargs) -> None:
    """The full checkpoint plus the adapter directory of a transformers model with adapter
    layers (see the module docstring); `kwargs` go to the model class's `save_pretrained`
    (the Trainer passes `state_dict` and `is_main_process`). ValueError for `push_to_hub=True`,
    which would upload the folder before the adapter files and the refusal are written."""
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) of a model with adapterops adapter "
                         "layers: save it locally, then upload the folder (huggingface_hub's "
                         "upload_folder)")
    type(model).save_pretrained(model, directory, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    save_adapters(model, directory)
    path = Path(directory) / MODEL_CONFIG_FILE
    config = json.loads(path.read_text())
    config["transformers_weights"] = PLAIN_LOAD_REFUSAL
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_tensors(directory: Path) -> dict:
    """Every tensor of a save_pretrained directory: model.safetensors, or the shards its index
    names (a model above save_pretrained's max_shard_size)."""
    safetensors = safetensors_module()
    single, index = directory / MODEL_WEIGHTS_FILE, directory / f"{MODEL_WEIGHTS_FILE}.index.json"
    if single.is_file():
        return safetensors.load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {key: t for shard in shards for key, t in safetensors.load_file(str(directory / shard)).items()}
    raise ValueError(f"load_pretrained: {directory} has no {MODEL_WEIGHTS_FILE} (nor its index): "
                     "an adapter directory (save_adapters) goes on the original base model with "
                     "adapterops.load_adapters(base_model, directory)")


def load_pretrained(directory: Union[str, Path], model_class=None, *, backend: Optional[str] = None,
                    **kwargs) -> nn.Module:
    """The trained model a `save_pretrained` directory (a Trainer checkpoint) holds: the model
    class (`model_class`, or the transformers class `config.json`'s `architectures` names) built
    by its `from_pretrained` from the directory's config and base tensors (`kwargs`: dtype,
    device_map, ...), its adapter layers rebuilt as `adapter_config.json` describes (on
    `backend`; None: dispatch picks) and loaded from `model.safetensors` (or its shards).
    Equals the saved model bit for bit on the same device and dtype. ValueError for a
    directory without the adapter files or without the model's tensors."""
    description = read_description(directory)
    transformers = optional_import("transformers", "load_pretrained builds transformers models")
    directory = Path(directory)
    tensors = _model_tensors(directory)
    config = transformers.AutoConfig.from_pretrained(str(directory))
    if getattr(config, "transformers_weights", None) == PLAIN_LOAD_REFUSAL:
        delattr(config, "transformers_weights")
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"load_pretrained: {directory / MODEL_CONFIG_FILE} names no "
                             f"transformers model class (architectures={names!r}); pass "
                             "model_class=")
    entries = description["layers"]
    # Built from the tensors, not the directory: from_pretrained on it would take
    # adapter_config.json for a PEFT adapter. The plain model gets the tensors it has (an adapter
    # layer's weight, in Conv1D's (in, out) layout where the base is one, and bias); the adapter
    # layers take theirs below.
    prefixes = tuple(_key(name, "") for name in entries)
    base_tensors = {key: t for key, t in tensors.items() if not key.startswith(prefixes)}
    for name, entry in entries.items():
        weight = tensors[_key(name, "weight")]
        base_tensors[_key(name, "weight")] = weight.t() if entry["base"] == "conv1d" else weight
        if entry["bias"]:
            base_tensors[_key(name, "bias")] = tensors[_key(name, "bias")]
    model = model_class.from_pretrained(None, config=config, state_dict=base_tensors, **kwargs)
    modules = dict(model.named_modules())
    problems = [p for name, entry in entries.items()
                if (p := _check_base(name, modules.get(name), entry)) is not None]
    if problems:
        raise ValueError(f"load_pretrained: {model_class.__name__} does not match the adapter: "
                         + "; ".join(problems))
    layers = []
    for name, entry in entries.items():
        layer = METHODS[entry["method"]].from_linear(modules[name], **entry["options"],
                                                     backend=backend, initialise=False)
        prefix = _key(name, "")
        layer.load_trained_state({key[len(prefix):]: t for key, t in tensors.items()
                                  if key.startswith(prefix)}, name)
        layers.append((name, layer))
    config_dict = description.get("config")
    install(model, layers, AdapterConfig.from_dict(config_dict) if config_dict is not None else None)
    return model


def install(model: nn.Module, layers: list[tuple[str, AdapterLayer]], config: Optional[AdapterConfig]) -> None:
    """Puts the built adapter `layers` into `model` at their names, freezes every parameter
    that is not theirs, records `config` (as `model.adapterops_config`) and gives a
    transformers model adapterops' `save_pretrained` while it has adapter layers (see the
    module docstring), and a `load_state_dict` check (`_refuse_partial_adapter_load`). Shared
    by `inject`, the loaders here and `adapterops.peft.load`."""
    for name, layer in layers:
        model.set_submodule(name, layer)
    # Every adapter layer's parameters keep their own settings, those of an earlier inject too.
    adapters = {id(p) for _, layer in adapter_layers(model) for p in layer.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in adapters:
            parameter.requires_grad_(False)
    if config is not None:
        model.adapterops_config = config
    _attach_save_pretrained(model)
    if _refuse_partial_adapter_load not in model._load_state_dict_post_hooks.values():
        model.register_load_state_dict_post_hook(_refuse_partial_adapter_load)


def _refuse_partial_adapter_load(model: nn.Module, incompatible) -> None:
    """A `load_state_dict` that leaves adapter tensors unloaded, or brings adapter tensors the
    model has no place for, raises even with strict=False (how the HF Trainer resumes and
    loads the best model): training on would silently run another model than the one saved,
    e.g. a checkpoint of another target_modules or method."""
    layers = adapter_layers(model)
    prefixes = tuple(_key(name, "") for name, _ in layers)
    adapter_tensors = {key for _, layer in layers for key in layer.adapter_state()}
    missing = [k for k in incompatible.missing_keys
               if k.startswith(prefixes) and k.rpartition(".")[2] in adapter_tensors]
    unexpected = [k for k in incompatible.unexpected_keys if k.rpartition(".")[2] in adapter_tensors]
    if missing or unexpected:
        raise RuntimeError(
            f"load_state_dict: the state does not match the model's adapter layers: adapter tensors "
            f"missing {missing[:6] or 'none'}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6] or 'none'}{' ...' if len(unexpected) > 6 else ''}; load it into a model "
            "injected with the same adapterops.AdapterConfig (adapter_config.json beside the "
            "checkpoint records it)")


class _AdapterSavePretrained:
    """Stands in for a transformers model's `save_pretrained` while it has adapter layers:
    `save_pretrained` (see the module docstring); the class's own once none is left."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        if not adapter_layers(self.model):
            return type(self.model).save_pretrained(self.model, *args, **kwargs)
        return save_pretrained(self.model, *args, **kwargs)


def _attach_save_pretrained(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _AdapterSavePretrained(model)
