"""The model-level API on config-built tiny transformers models (no downloads): AdapterConfig,
inject, trainable_parameters, training, generate, gradient checkpointing, save_adapters /
load_adapters, merge_and_unload, disable_adapters, save_pretrained / load_pretrained, torch.compile and
bad configs.

Models: a 2-layer LLaMA (nn.Linear projections, no bias, no dropout) and a 2-layer GPT-2
(transformers Conv1D for c_attn, c_proj, c_fc; with bias and dropout). Every method runs on
LLaMA; LoRA, PiSSA, LaMDA and HD-PiSSA also on GPT-2 (HydraLoRA refuses Conv1D). The layers
run the default dispatch (the Triton kernels, under the interpreter on CPU).

A module-scoped fixture trains one model per (method, architecture) once; the tests that read
it do not change it (merge works on a deep copy, disable_adapters restores it).
"""
import copy
import dataclasses
import json
import math
import re
import shutil
import time
import unittest.mock
import warnings

import pytest
import torch
from torch import nn

import adapterops
from adapterops.hdpissa import HDPiSSAOptimizer
from adapterops.hydra import collect_balance_loss
from adapterops.inject import adapter_layers

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

SEED = 1234
RANK, ALPHA = 4, 8.0
VOCAB = 64
EPS32 = torch.finfo(torch.float32).eps

# method -> (AdapterConfig fields, trainable tensors per layer, tensors per layer in the file)
CASES = {
    "lora": (dict(method="lora"), {"lora_A", "lora_B"}, {"lora_A", "lora_B"}),
    "pissa": (dict(method="lora", init="pissa"), {"lora_A", "lora_B"},
              {"lora_A", "lora_B", "lora_A0", "lora_B0"}),
    "lamda": (dict(method="lamda"), {"lora_S", "lora_B"}, {"lora_A", "lora_S", "lora_B"}),
    "lamda_svd": (dict(method="lamda", init="svd"), {"lora_S", "lora_B"},
                  {"lora_A", "lora_S", "lora_B", "lora_A0", "lora_S0", "lora_B0"}),
    "hydra": (dict(method="hydra", num_heads=2, balance_loss_weight=0.05),
              {"lora_A", "lora_B", "lora_router"}, {"lora_A", "lora_B", "lora_router"}),
    # HD-PiSSA trains W itself: the file holds it and every rank's factors (fp32 model: no
    # master copy).
    "hdpissa": (dict(method="hdpissa", world_size=2, rank_index=0), {"lora_A", "lora_B"},
                {"weight", "factor_A", "factor_B"}),
}
REWRITES_WEIGHT = {"pissa", "lamda_svd"}   # the init replaces W by a residual
GPT2_CASES = ("lora", "pissa", "lamda", "hdpissa")
MODEL_CASES = [(c, "llama") for c in CASES] + [(c, "gpt2") for c in GPT2_CASES]

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GPT2_CONV1DS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build(arch: str, **overrides) -> nn.Module:
    """The base model of `arch`, in eval mode, its weights drawn from SEED (the same model on
    every call with the same arguments)."""
    torch.manual_seed(SEED)
    if arch == "llama":
        model = LlamaForCausalLM(llama_config(**overrides))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, **overrides))
    return model.eval()


def target_names(arch: str, n_layers: int = 2) -> list[str]:
    """The layers target_modules=None ("all-linear") selects: every projection, not lm_head."""
    if arch == "llama":
        return [f"model.layers.{i}.{n}" for i in range(n_layers) for n in LLAMA_LINEARS]
    return [f"transformer.h.{i}.{n}" for i in range(n_layers) for n in GPT2_CONV1DS]


def config_for(case: str, **overrides) -> adapterops.AdapterConfig:
    fields = dict(rank=RANK, alpha=ALPHA, **CASES[case][0])
    fields.update(overrides)
    return adapterops.AdapterConfig(**fields)


# Token batches (drawn from their own generator: independent of the tests' seeding).
_gen = torch.Generator().manual_seed(7)
IDS = torch.randint(0, VOCAB, (2, 8), generator=_gen)
PROMPT = torch.randint(0, VOCAB, (1, 4), generator=_gen)


def logits_of(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Eval-mode logits (the model is put back in the mode it was in)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was_training)
    return out


def assert_close_fp32(name: str, got: torch.Tensor, want: torch.Tensor, ulps: float = 64) -> None:
    """Max abs error at most `ulps` fp32 ulps of `want`'s scale (its largest magnitude)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    bound = ulps * EPS32 * scale
    assert err <= bound, (f"{name}: max abs error {err:.3e} > {bound:.3e} ({ulps} fp32 ulps at "
                          f"scale {scale:.3e})")


def perturb_adapters(model: nn.Module, std: float = 0.05) -> None:
    """Moves every trainable adapter tensor off its init (B = 0 would hide A's gradient)."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def trainable_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g for (n, _), g in zip(named, grads)}


def training_loss(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """The causal-LM loss plus the HydraLoRA balance losses the forward kept (zero otherwise)."""
    return model(input_ids=ids, labels=ids).loss + collect_balance_loss(model)


# --- One trained model per (method, architecture) -------------------------------------------

STEPS, LR = 3, 2e-2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor = IDS) -> float:
    """The causal-LM loss of `logits` (what model(..., labels=ids).loss computes)."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1)).item()


@dataclasses.dataclass
class Trained:
    case: str
    arch: str
    model: nn.Module
    base_logits: torch.Tensor        # the ORIGINAL base model's
    base_total: int                  # its parameter count
    init_logits: torch.Tensor        # right after inject
    init_trainable: tuple            # trainable_parameters right after inject
    losses: tuple                    # eval loss before and after training
    balance_losses: list             # the collected balance loss of each step (hydra)
    logits: torch.Tensor             # after training


@pytest.fixture(scope="module", params=MODEL_CASES, ids=[f"{c}-{a}" for c, a in MODEL_CASES])
def trained(request) -> Trained:
    """STEPS steps on IDS (AdamW; HD-PiSSA: its optimizer with 2 virtual ranks, one shard of
    the batch each), eval-mode logits before and after. Every forward through the adapters
    costs about 0.25 s under the Triton interpreter: the fixture runs as few as it can."""
    case, arch = request.param
    base = build(arch)
    base_logits = logits_of(base)
    base_total = adapterops.trainable_parameters(base)[1]
    model = adapterops.inject(base, config_for(case))
    init_logits = logits_of(model)
    init_trainable = adapterops.trainable_parameters(model)
    torch.manual_seed(SEED + 1)  # GPT-2's dropout masks
    balance = []
    model.train()
    if case == "hdpissa":
        optimizer = HDPiSSAOptimizer(model, lr=LR, virtual_ranks=True)
        for _ in range(STEPS):
            for k, shard in enumerate(IDS.chunk(2)):
                with optimizer.virtual_rank(k):
                    model(input_ids=shard, labels=shard).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        for _ in range(STEPS):
            task = model(input_ids=IDS, labels=IDS).loss
            extra = collect_balance_loss(model)
            balance.append(extra.detach().clone())
            (task + extra).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    logits = logits_of(model)
    return Trained(case, arch, model, base_logits, base_total, init_logits, init_trainable,
                   (lm_loss(init_logits), lm_loss(logits)), balance, logits)


# --- 1. inject, training, generate, gradient checkpointing -----------------------------------

def test_inject_keeps_output_and_freezes_the_rest(trained):
    t, where = trained, f"{trained.case}-{trained.arch}"
    # The adapter starts as the identity (B = 0) or as a residual split of W (PiSSA, LaMDA
    # "svd"; HD-PiSSA's forward is W itself): only rounding separates it from the base model.
    assert_close_fp32(f"{where}: logits right after inject vs the un-injected model",
                      t.init_logits, t.base_logits)
    layers = adapter_layers(t.model)
    names = [name for name, _ in layers]
    assert names == target_names(t.arch), f"{where}: adapter layers {names}"
    cls = adapterops.AdapterConfig(rank=RANK, alpha=ALPHA, **CASES[t.case][0]).layer_class
    assert all(type(layer) is cls for _, layer in layers), f"{where}: layer types"
    assert type(t.model.get_output_embeddings()) is nn.Linear, (
        f"{where}: all-linear must leave the output embeddings (lm_head) alone")
    trainable_names = CASES[t.case][1]
    adapter_trainable, adapter_extra = 0, 0
    for name, layer in layers:
        own = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert own == trainable_names, f"{where}: {name} trains {sorted(own)}"
        adapter_trainable += sum(p.numel() for p in layer.parameters() if p.requires_grad)
        adapter_extra += sum(p.numel() for n, p in layer.named_parameters()
                             if n not in ("weight", "bias"))
    trainable, total = t.init_trainable
    assert trainable == adapter_trainable, (f"{where}: trainable_parameters says {trainable}, the "
                                            f"adapter layers hold {adapter_trainable}")
    assert total == t.base_total + adapter_extra, (
        f"{where}: total {total} != base {t.base_total} + adapter tensors {adapter_extra}")
    prefixes = tuple(name + "." for name in names)
    thawed = [n for n, p in t.model.named_parameters()
              if p.requires_grad and not n.startswith(prefixes)]
    assert not thawed, f"{where}: non-adapter parameters left trainable: {thawed}"
    assert t.model.adapterops_config == config_for(t.case)


def test_training_lowers_the_loss(trained):
    t, where = trained, f"{trained.case}-{trained.arch}"
    first, last = t.losses
    print(f"{where}: eval loss {first:.4f} -> {last:.4f}")
    assert math.isfinite(first) and math.isfinite(last), f"{where}: losses {t.losses}"
    assert last < 0.98 * first, f"{where}: eval loss {first:.4f} -> {last:.4f}"
    assert not torch.equal(t.logits, t.init_logits), f"{where}: training changed nothing"
    if t.case == "hydra":
        assert all(b.item() > 0 for b in t.balance_losses), (
            f"{where}: balance losses {[b.item() for b in t.balance_losses]}: none kept")
    else:
        assert all(b.item() == 0 for b in t.balance_losses), t.balance_losses


def test_generate_greedy_matches_the_uncached_argmax(trained):
    t, where = trained, f"{trained.case}-{trained.arch}"
    n, new = PROMPT.shape[1], 2
    with torch.no_grad():
        out = t.model.generate(PROMPT, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape == (1, n + new), f"{where}: generate gave {tuple(out.shape)}"
    assert torch.equal(out[:, :n], PROMPT)
    # Each new token is the argmax of one full (uncached, causal) forward over what precedes
    # it: the KV-cache path runs the same adapters.
    expected = logits_of(t.model, out[:, :-1])[0, n - 1:].argmax(-1)
    assert torch.equal(out[0, n:], expected), (f"{where}: generated {out[0, n:].tolist()}, the "
                                               f"uncached argmax is {expected.tolist()}")


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(case):
    """One decoder layer is enough to checkpoint (and halves the interpreter's time)."""
    model = adapterops.inject(build("llama", num_hidden_layers=1), config_for(case))
    perturb_adapters(model)
    model.train()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    loss = training_loss(model)
    grads = trainable_grads(model, loss)
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the transformers 5 alias's notice
        model.gradient_checkpointing_enable()
    calls.clear()
    loss_ckpt = training_loss(model)
    grads_ckpt = trainable_grads(model, loss_ckpt)
    assert len(calls) == 2, f"{case}: q_proj ran {len(calls)} times: no recomputation happened"
    assert_close_fp32(f"{case}: loss with checkpointing", loss_ckpt, loss, ulps=4)
    assert grads_ckpt.keys() == grads.keys()
    for name, g in grads.items():
        assert g.abs().max() > 0, f"{case}: {name} has a zero gradient without checkpointing"
        assert_close_fp32(f"{case}: gradient of {name} with checkpointing", grads_ckpt[name], g,
                          ulps=16)


@pytest.mark.parametrize("case", ["lora", "lamda"])
def test_gradient_checkpointing_replays_the_adapter_dropout(case):
    """With dropout the recompute draws the forward's masks again (the seeds come from torch's
    generator, which checkpointing restores): the same loss and gradients as without it."""
    model = adapterops.inject(build("llama", num_hidden_layers=1), config_for(case, dropout=0.25))
    perturb_adapters(model)
    model.train()
    torch.manual_seed(5)
    loss = training_loss(model)
    grads = trainable_grads(model, loss)
    torch.manual_seed(6)
    assert training_loss(model) != loss, f"{case}: the dropout drew nothing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the transformers 5 alias's notice
        model.gradient_checkpointing_enable()
    torch.manual_seed(5)
    loss_ckpt = training_loss(model)
    grads_ckpt = trainable_grads(model, loss_ckpt)
    assert_close_fp32(f"{case}: loss with checkpointing", loss_ckpt, loss, ulps=4)
    assert grads_ckpt.keys() == grads.keys()
    for name, g in grads.items():
        assert_close_fp32(f"{case}: gradient of {name} with checkpointing", grads_ckpt[name], g,
                          ulps=16)


@pytest.mark.parametrize("case", ["lora", "lamda_svd"])
def test_a_bf16_model_gets_fp32_adapters_that_train_fused_and_survive_saving(case, tmp_path):
    """adapter_dtype=None: fp32 adapters on a bf16 base, as PEFT keeps them; every adapted
    call runs the fused op, the adapters' gradients are fp32, and save/load restores the
    dtype. A forced dtype is kept too."""
    model = adapterops.inject(build("llama", num_hidden_layers=1).to(torch.bfloat16), config_for(case))
    layers = adapter_layers(model)
    assert layers and all(layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
                          and layer.lora_B.dtype == torch.float32 for _, layer in layers)
    perturb_adapters(model)
    calls = []
    real = adapterops.modules.lowrank.lowrank_linear
    with unittest.mock.patch.object(adapterops.modules.lowrank, "lowrank_linear",
                                    lambda *a, **k: calls.append(1) or real(*a, **k)):
        grads = trainable_grads(model, training_loss(model))
    assert len(calls) == len(layers)
    assert grads and all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads.values())
    adapterops.save_adapters(model, tmp_path)
    again = adapterops.load_adapters(build("llama", num_hidden_layers=1).to(torch.bfloat16), tmp_path)
    for (name, layer), (_, loaded) in zip(layers, adapter_layers(again)):
        for key, tensor in layer.adapter_state().items():
            assert torch.equal(getattr(loaded, key), tensor), f"{name}.{key}"
    assert torch.equal(logits_of(again), logits_of(model))
    forced = adapterops.inject(build("llama", num_hidden_layers=1).to(torch.bfloat16),
                               config_for(case, adapter_dtype=torch.bfloat16))
    assert all(layer.lora_A.dtype == torch.bfloat16 for _, layer in adapter_layers(forced))
    with pytest.raises(ValueError, match="adapter_dtype torch.bfloat16 on a torch.float32 base"):
        adapterops.inject(build("llama", num_hidden_layers=1), config_for(case, adapter_dtype="bfloat16"))


# --- 2. save_adapters / load_adapters ---------------------------------------------------------

def test_save_and_load_adapters_reproduce_the_trained_model(trained, tmp_path):
    t, where = trained, f"{trained.case}-{trained.arch}"
    adapterops.save_adapters(t.model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                          "adapter_model.safetensors"]
    tensors = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = {f"{name}.{key}" for name in target_names(t.arch) for key in CASES[t.case][2]}
    assert set(tensors) == expected, (f"{where}: unexpected keys {sorted(set(tensors) - expected)}"
                                      f", missing {sorted(expected - set(tensors))}")
    description = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapterops.AdapterConfig.from_dict(description["config"]) == t.model.adapterops_config
    assert sorted(description["layers"]) == sorted(target_names(t.arch))

    fresh = build(t.arch)
    loaded = adapterops.load_adapters(fresh, tmp_path)
    assert loaded is fresh
    assert [n for n, _ in adapter_layers(loaded)] == target_names(t.arch)
    logits = logits_of(loaded)
    assert torch.equal(logits, t.logits), (f"{where}: loaded logits differ from the trained "
                                           f"model's by {(logits - t.logits).abs().max():.3e}")
    assert adapterops.trainable_parameters(loaded) == adapterops.trainable_parameters(t.model)
    assert loaded.adapterops_config == t.model.adapterops_config
    for (name, got), (_, want) in zip(adapter_layers(loaded), adapter_layers(t.model)):
        assert got.layer_options() == want.layer_options(), f"{where}: {name} options"
    loaded.save_pretrained(tmp_path / "pretrained")  # adapterops' save_pretrained, as after inject
    assert (tmp_path / "pretrained" / "adapter_config.json").is_file()


def test_hdpissa_virtual_ranks_leave_the_layers_on_their_configured_rank(tmp_path):
    """After training with virtual ranks, the layers hold the rank they were built for (the
    config's rank_index), so that the saved directory agrees with itself: its config and its
    layers name the same rank, and a process of a real group that loads it trains its own."""
    config = config_for("hdpissa", target_modules=["q_proj"])
    model = adapterops.inject(build("llama", num_hidden_layers=1), config)
    optimizer = HDPiSSAOptimizer(model, lr=LR, virtual_ranks=True)
    for k, shard in enumerate(IDS.chunk(2)):
        with optimizer.virtual_rank(k):
            model(input_ids=shard, labels=shard).loss.backward()
    optimizer.step()
    layer = model.model.layers[0].self_attn.q_proj
    adapterops.save_adapters(model, tmp_path)
    description = json.loads((tmp_path / "adapter_config.json").read_text())
    saved = description["layers"]["model.layers.0.self_attn.q_proj"]["options"]["rank_index"]
    assert (layer.rank_index, saved) == (config.rank_index, description["config"]["rank_index"]), (
        f"after the virtual_rank blocks the layer holds rank {layer.rank_index} and the file "
        f"saves rank {saved} for it, while the config (and the file's config) say rank "
        f"{config.rank_index}")
    rows = slice(config.rank_index * RANK, (config.rank_index + 1) * RANK)
    assert torch.equal(layer.lora_A, layer.factor_A[rows]), "lora_A is not the config's rank's A"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A trained-looking (perturbed) LoRA adapter of the 2-layer LLaMA, saved."""
    torch.manual_seed(SEED)
    model = adapterops.inject(build("llama"), config_for("lora"))
    perturb_adapters(model)
    directory = tmp_path_factory.mktemp("lora_adapter")
    adapterops.save_adapters(model, directory)
    return directory


def assert_untouched(model: nn.Module, what: str) -> None:
    """A failed inject / load leaves no trace: no adapter layer, nothing frozen, no guard."""
    assert not adapter_layers(model), f"{what}: adapter layers were installed"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen, f"{what}: parameters frozen: {frozen[:4]}"
    assert "save_pretrained" not in vars(model) and not hasattr(model, "adapterops_config"), what


@pytest.mark.parametrize("surgery,named", [
    ("one_layer", [f"model.layers.1.{n}: not in the model" for n in LLAMA_LINEARS]),
    ("narrow_mlp", [f"model.layers.{i}.mlp.{n}: the model has (kind, in, out, bias) = "
                    for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")]),
    ("identity", ["model.layers.0.self_attn.q_proj: a Identity, not an nn.Linear or Conv1D"]),
])
def test_load_adapters_into_a_model_that_does_not_match(lora_dir, surgery, named):
    if surgery == "one_layer":
        model = build("llama", num_hidden_layers=1)
    elif surgery == "narrow_mlp":
        model = build("llama", intermediate_size=40)
    else:
        model = build("llama")
        model.model.layers[0].self_attn.q_proj = nn.Identity()
    with pytest.raises(ValueError, match="does not match the adapter") as info:
        adapterops.load_adapters(model, lora_dir)
    message = str(info.value)
    missing = [n for n in named if n not in message]
    assert not missing, f"{surgery}: the error does not name {missing}: {message}"
    if surgery == "narrow_mlp":
        assert "self_attn" not in message, f"matching layers named too: {message}"
        assert "('linear', 40, 32, False)" in message and "('linear', 48, 32, False)" in message, message
    assert_untouched(model, surgery)


def _rewrite_file(directory, target, edit) -> None:
    shutil.copytree(directory, target, dirs_exist_ok=True)
    path = target / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(str(path))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(path))


def test_load_adapters_names_missing_and_unexpected_tensors(lora_dir, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.mlp.down_proj.lora_A"]
        tensors["model.layers.0.self_attn.q_proj.lora_C"] = torch.zeros(2)
        tensors["model.embed_tokens.weight"] = torch.zeros(VOCAB, 32)
    _rewrite_file(lora_dir, tmp_path, edit)
    model = build("llama")
    with pytest.raises(ValueError, match="does not match adapter_config.json") as info:
        adapterops.load_adapters(model, tmp_path)
    message = str(info.value)
    for key in ("missing ['model.layers.1.mlp.down_proj.lora_A']",
                "'model.layers.0.self_attn.q_proj.lora_C'", "'model.embed_tokens.weight'"):
        assert key in message, f"the error does not name {key}: {message}"
    assert_untouched(model, "missing/unexpected tensors")


def test_load_adapters_names_a_tensor_of_the_wrong_shape(lora_dir, tmp_path):
    def edit(tensors):
        tensors["model.layers.1.self_attn.v_proj.lora_B"] = torch.zeros(16, RANK + 1)
    _rewrite_file(lora_dir, tmp_path, edit)
    model = build("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: .*lora_B: "
                                         r"\(16, 5\) where the layer has \(16, 4\)"):
        adapterops.load_adapters(model, tmp_path)
    assert_untouched(model, "wrong shape")


def test_load_adapters_without_a_directory(tmp_path):
    model = build("llama")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        adapterops.load_adapters(model, tmp_path)
    assert_untouched(model, "no directory")
    with pytest.raises(ValueError, match="no adapterops adapter layer"):
        adapterops.save_adapters(model, tmp_path)


# --- 3. merge_and_unload ----------------------------------------------------------------------

def test_merge_and_unload(trained, tmp_path):
    t, where = trained, f"{trained.case}-{trained.arch}"
    model = copy.deepcopy(t.model)
    if t.case == "hydra":
        with pytest.raises(ValueError, match="cannot be merged") as info:
            adapterops.merge_and_unload(model)
        missing = [n for n in target_names(t.arch) if n not in str(info.value)]
        assert not missing, f"{where}: the error does not name {missing}: {info.value}"
        assert len(adapter_layers(model)) == len(target_names(t.arch)), "hydra layers removed"
        kept = adapterops.merge_and_unload(model, skip_unmergeable=True)
        assert kept is model and [n for n, _ in adapter_layers(kept)] == target_names(t.arch)
        assert torch.equal(logits_of(kept), t.logits), f"{where}: skipping changed the model"
        kept.save_pretrained(tmp_path)  # the hydra layers are still there: adapterops' save
        assert (tmp_path / "adapter_config.json").is_file()
        return
    merged = adapterops.merge_and_unload(model)
    assert merged is model
    assert not adapter_layers(merged), f"{where}: adapter layers left {adapter_layers(merged)}"
    plain = Conv1D if t.arch == "gpt2" else nn.Linear
    wrong = [(n, type(merged.get_submodule(n)).__name__) for n in target_names(t.arch)
             if type(merged.get_submodule(n)) is not plain]
    assert not wrong, f"{where}: not plain {plain.__name__}: {wrong}"
    assert not any(p.requires_grad for p in merged.parameters()), f"{where}: merged params thawed"
    merged_logits = logits_of(merged)
    # W + s B S A rounded once to fp32 instead of two GEMMs summed: a few fp32 ulps per layer.
    assert_close_fp32(f"{where}: merged vs adapter logits", merged_logits, t.logits)

    merged.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    assert not adapter_layers(reloaded)
    got = logits_of(reloaded)
    assert torch.equal(got, merged_logits), (f"{where}: from_pretrained logits differ from the "
                                             f"merged model's by {(got - merged_logits).abs().max():.3e}")


# --- 4. disable_adapters ----------------------------------------------------------------------

def test_disable_adapters_runs_the_original_base_model(trained):
    t, where = trained, f"{trained.case}-{trained.arch}"
    layers = adapter_layers(t.model)
    if t.case == "hdpissa":
        with pytest.raises(ValueError, match="keep no base weight") as info:
            with adapterops.disable_adapters(t.model):
                pass
        missing = [n for n in target_names(t.arch) if n not in str(info.value)]
        assert not missing, f"{where}: the error does not name {missing}"
        assert torch.equal(logits_of(t.model), t.logits)
        return
    assert not torch.equal(t.logits, t.base_logits), f"{where}: the adapters do nothing"
    with adapterops.disable_adapters(t.model) as same:
        assert same is t.model
        disabled = logits_of(t.model)
    if t.arch == "llama" and t.case not in REWRITES_WEIGHT:
        # The layer computes F.linear(x, W, b), exactly what the original nn.Linear computes.
        assert torch.equal(disabled, t.base_logits), (
            f"{where}: disabled logits differ from the base model's by "
            f"{(disabled - t.base_logits).abs().max():.3e}")
    else:
        # PiSSA / LaMDA "svd": W_res + s B0 S0 A0; GPT-2: F.linear instead of Conv1D's addmm.
        assert_close_fp32(f"{where}: disabled vs the ORIGINAL base model", disabled, t.base_logits)
    assert not any(layer.adapters_disabled for _, layer in layers), f"{where}: not restored"
    assert torch.equal(logits_of(t.model), t.logits), f"{where}: not the trained model afterwards"
    with pytest.raises(RuntimeError, match="inside"):
        with adapterops.disable_adapters(t.model):
            raise RuntimeError("inside")
    assert not any(layer.adapters_disabled for _, layer in layers), f"{where}: not restored"


# --- 5. save_pretrained / load_pretrained --------------------------------------------------------

def test_save_pretrained_writes_a_checkpoint_that_load_pretrained_restores(trained, tmp_path):
    """A full checkpoint plus the adapter directory: load_pretrained rebuilds the trained model
    bit for bit, load_adapters applies it to the original base, and the plain class's
    from_pretrained raises naming load_pretrained (it would drop the adapters and, for PiSSA and
    LaMDA "svd", take the residual for W)."""
    t, where = trained, f"{trained.case}-{trained.arch}"
    t.model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "adapter_config.json",
            "adapter_model.safetensors"} <= names, f"{where}: wrote {sorted(names)}"
    loaded = adapterops.load_pretrained(tmp_path)
    assert type(loaded) is type(t.model)
    assert [n for n, _ in adapter_layers(loaded)] == target_names(t.arch)
    want = t.model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{where}: load_pretrained differs in {differ[:4]}"
    assert torch.equal(logits_of(loaded), t.logits), f"{where}: load_pretrained logits differ"
    assert adapterops.trainable_parameters(loaded) == adapterops.trainable_parameters(t.model)
    assert loaded.adapterops_config == t.model.adapterops_config
    applied = adapterops.load_adapters(build(t.arch), tmp_path)
    assert torch.equal(logits_of(applied), t.logits), f"{where}: load_adapters logits differ"
    for loader in (type(t.model), transformers.AutoModelForCausalLM):
        with pytest.raises(ValueError, match=r"adapterops\.load_pretrained\(directory\)"):
            loader.from_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).vocab_size == VOCAB
    with pytest.raises(ValueError, match="push_to_hub"):
        t.model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_load_pretrained_reads_shards_and_rejects_what_it_cannot_rebuild(tmp_path):
    model = adapterops.inject(build("llama"), config_for("pissa"))
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    loaded = adapterops.load_pretrained(tmp_path / "sharded")
    assert torch.equal(logits_of(loaded), logits_of(model))
    build("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        adapterops.load_pretrained(tmp_path / "plain")
    adapterops.save_adapters(model, tmp_path / "adapters")
    with pytest.raises(ValueError, match=r"has no model.safetensors .*load_adapters"):
        adapterops.load_pretrained(tmp_path / "adapters")


# --- 6. torch.compile -------------------------------------------------------------------------

def _compare_compiled(model: nn.Module, fullgraph: bool, what: str) -> float:
    """Compiled forward + backward (training loss with the balance losses) against eager's;
    returns the seconds the first compiled step took."""
    torch._dynamo.reset()
    model.train()
    loss = training_loss(model)
    grads = trainable_grads(model, loss)
    start = time.perf_counter()
    compiled = torch.compile(model, fullgraph=fullgraph)
    loss_c = training_loss(compiled)
    grads_c = trainable_grads(model, loss_c)
    seconds = time.perf_counter() - start
    assert_close_fp32(f"{what}: compiled loss", loss_c, loss, ulps=16)
    for name, g in grads.items():
        assert g.abs().max() > 0, f"{what}: {name} has a zero eager gradient"
        assert_close_fp32(f"{what}: compiled gradient of {name}", grads_c[name], g, ulps=32)
    torch._dynamo.reset()
    print(f"torch.compile {what} fullgraph={fullgraph}: first forward+backward {seconds:.1f} s")
    return seconds


def test_torch_compile_lora_and_lamda_match_eager():
    """One compile covers both (Inductor on CPU: 10-25 s for a 1-layer LLaMA with a cold
    cache, about 5 s warm): LoRA on the attention projections, LaMDA on the MLP."""
    model = build("llama", num_hidden_layers=1)
    adapterops.inject(model, config_for("lora", target_modules=["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]))
    adapterops.inject(model, config_for("lamda", target_modules=["gate_proj", "up_proj",
                                                                 "down_proj"]))
    # The second inject froze every parameter but its own (the LoRA factors too): train both.
    for _, layer in adapter_layers(model):
        for key in CASES[layer.method][1]:
            getattr(layer, key).requires_grad_(True)
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"FusedLoRALinear",
                                                                   "FusedLaMDALinear"}
    perturb_adapters(model)
    _compare_compiled(model, fullgraph=False, what="lora+lamda")


def test_torch_compile_hydra_with_balance_loss_fullgraph():
    """fullgraph=True compiles HydraLoRA with its balance loss: in fullgraph mode dynamo
    captures balance_loss's bincount (an output size that depends on the data); without
    fullgraph it breaks the graph there, once per HydraLoRA layer."""
    model = adapterops.inject(build("llama", num_hidden_layers=1),
                              config_for("hydra", target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_adapters(model)
    _compare_compiled(model, fullgraph=True, what="hydra")


# --- 7. inject and AdapterConfig: bad input ---------------------------------------------------

@pytest.mark.parametrize("fields,match", [
    (dict(method="prefix"), r"unknown method 'prefix'.*lora, lamda, hydra, hdpissa"),
    (dict(method="lora", num_heads=2), r"num_heads\b.*method 'lora'"),
    (dict(method="lamda", world_size=2), r"world_size\b.*method 'lamda'"),
    (dict(method="hdpissa", init="pissa"), r"\binit\b.*method 'hdpissa'"),
    (dict(method="hydra"), r"'hydra' needs num_heads"),
    (dict(method="lora", rank=0), r"\brank\b.*\b0$"),
    (dict(method="lora", rank=2.5), r"\brank\b.*2\.5"),
    (dict(method="lora", rank=True), r"\brank\b.*True"),
    (dict(method="lora", alpha=float("inf")), r"\balpha\b.*inf"),
    (dict(method="lora", target_modules=[]), r"target_modules\b.*\[\]"),
    (dict(method="lora", target_modules="q_proj("), r"target_modules 'q_proj\(' is not a valid"),
    (dict(method="lora", backend="cutlass"), r"backend='cutlass' is not a known backend"),
], ids=["method", "num_heads-lora", "world_size-lamda", "init-hdpissa", "hydra-no-heads", "rank-0",
        "rank-float", "rank-bool", "alpha-inf", "targets-empty", "targets-bad-regex", "backend"])
def test_adapter_config_rejects(fields, match):
    args = dict(rank=RANK, alpha=ALPHA)
    args.update(fields)
    with pytest.raises(ValueError, match=match):
        adapterops.AdapterConfig(**args)


def test_adapter_config_from_dict_rejects():
    good = config_for("hydra").to_dict()
    with pytest.raises(ValueError, match=r"unknown field\(s\) lora_dropout, r; known: adapter_dtype, alpha"):
        adapterops.AdapterConfig.from_dict({**good, "r": 8, "lora_dropout": 0.1})
    without = {k: v for k, v in good.items() if k != "rank"}
    with pytest.raises(ValueError, match=r"missing field\(s\) rank"):
        adapterops.AdapterConfig.from_dict(without)
    with pytest.raises(ValueError, match="takes a dict, got list"):
        adapterops.AdapterConfig.from_dict([good])
    with pytest.raises(ValueError, match=r"unknown field\(s\) peft_type"):
        adapterops.AdapterConfig.from_json(json.dumps({**good, "peft_type": "LORA"}))


@pytest.mark.parametrize("arch,config,error,match", [
    # Nothing matches: the message lists the model's linear layers.
    pytest.param("llama", dict(target_modules=["query"]), ValueError,
                 r"no nn.Linear or Conv1D in the model matches target_modules=\['query'\]; its "
                 r"linear layers: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj",
                 id="no-match-llama"),
    pytest.param("gpt2", dict(target_modules=["q_proj"]), ValueError,
                 r"its linear layers: transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj",
                 id="no-match-gpt2"),
    # A regular expression that matches only the MLP containers.
    pytest.param("llama", dict(target_modules=r".*\.mlp"), ValueError, r"\.mlp", id="regex-mlp"),
    # Leaves that are not linear layers are named.
    pytest.param("llama", dict(target_modules=["q_proj", "input_layernorm"]), ValueError,
                 r"cannot replace: model.layers.0.input_layernorm \(LlamaRMSNorm\), "
                 r"model.layers.1.input_layernorm \(LlamaRMSNorm\)", id="norm"),
    pytest.param("llama", dict(target_modules=["embed_tokens"]), ValueError,
                 r"model.embed_tokens \(Embedding\)", id="embedding"),
    # HydraLoRA refuses Conv1D: the first layer is named, nothing is replaced.
    pytest.param("gpt2", dict(method="hydra", num_heads=2), TypeError,
                 r"inject: layer transformer\.h\.0\.attn\.c_attn\b.*takes an nn\.Linear",
                 id="hydra-conv1d"),
    # PiSSA's rank fits q_proj (32 x 32) but not k_proj (16 x 32): all or nothing.
    pytest.param("llama", dict(init="pissa", rank=20), ValueError,
                 r"inject: layer model\.layers\.0\.self_attn\.k_proj\b.*rank must be <= 16",
                 id="pissa-rank-too-big"),
    pytest.param("llama", dict(method="hdpissa", world_size=2, rank_index=0, rank=12), ValueError,
                 r"model\.layers\.0\.self_attn\.k_proj\b.*world_size \* rank <= "
                 r"min\(in_features, out_features\): 2 \* 12 = 24 > 16", id="hdpissa-rank-too-big"),
    pytest.param("llama", dict(method="hdpissa", world_size=2, rank_index=2), ValueError,
                 r"rank_index must be an int in \[0, world_size\) = \[0, 2\), got 2",
                 id="hdpissa-rank-index"),
    pytest.param("llama", dict(method="hdpissa"), ValueError,
                 r"pass world_size and rank_index, or initialise a torch.distributed process group",
                 id="hdpissa-no-world"),
    pytest.param("llama", dict(dropout=1.0), ValueError,
                 r"model\.layers\.0\.self_attn\.q_proj\b.*dropout must be", id="dropout"),
    pytest.param("llama", dict(method="lamda", init="pissa"), ValueError,
                 r"init must be one of lora, svd, got 'pissa'", id="lamda-init"),
])
def test_inject_bad_input_leaves_the_model_untouched(arch, config, error, match):
    fields = dict(method="lora", rank=RANK, alpha=ALPHA)
    fields.update(config)
    model = build(arch)
    with pytest.raises(error, match=match):
        adapterops.inject(model, adapterops.AdapterConfig(**fields))
    assert_untouched(model, str(config))


def test_inject_a_container_next_to_a_linear_is_an_error():
    """PEFT's rule (and PEFT itself: "Target module LlamaMLP(...) is not supported"): a name in
    target_modules that selects a module which is not a linear layer is an error, even when
    other names select linear layers; inject must not silently skip the MLPs the user asked
    for."""
    model = build("llama")
    try:
        adapterops.inject(model, config_for("lora", target_modules=["q_proj", "mlp"]))
    except ValueError as exc:
        assert re.search(r"model\.layers\.0\.mlp(?![\w.])", str(exc)), (
            f"the error does not name model.layers.0.mlp: {exc}")
        assert_untouched(model, "['q_proj', 'mlp']")
    else:
        pytest.fail("inject accepted target_modules=['q_proj', 'mlp'] and replaced only "
                    f"{[n for n, _ in adapter_layers(model)]}: the modules 'mlp' selects "
                    "(LlamaMLP containers) were skipped without a word")


def test_inject_arguments_and_other_models():
    with pytest.raises(TypeError, match="config must be an adapterops.AdapterConfig, got dict"):
        adapterops.inject(build("llama"), config_for("lora").to_dict())
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        adapterops.inject("llama", config_for("lora"))

    class ScaledLinear(nn.Linear):  # a subclass is replaced too
        pass

    model = nn.Sequential(ScaledLinear(8, 8), nn.ReLU(), nn.Linear(8, 4),
                          nn.MultiheadAttention(8, 2))
    adapterops.inject(model, config_for("lora"))
    assert [n for n, _ in adapter_layers(model)] == ["0", "2"], (
        "all-linear takes nn.Linear subclasses and leaves an nn.MultiheadAttention's out_proj")
    assert "save_pretrained" not in vars(model), "a plain nn.Module gets no guard"
    assert adapterops.trainable_parameters(model)[0] == RANK * (8 + 8) + RANK * (8 + 4)
    # Explicitly naming lm_head (the output embeddings) replaces it, as PEFT does.
    llama = adapterops.inject(build("llama"), config_for("lora", target_modules=["lm_head"]))
    assert [n for n, _ in adapter_layers(llama)] == ["lm_head"]


def test_targets_by_list_and_regex_and_a_second_inject():
    model = build("llama")
    adapterops.inject(model, config_for("lora", target_modules=["q_proj", "v_proj"]))
    assert [n for n, _ in adapter_layers(model)] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    regex = adapterops.inject(build("gpt2"), config_for("lamda", target_modules=r".*\.1\.mlp\.c_.*"))
    assert [n for n, _ in adapter_layers(regex)] == ["transformer.h.1.mlp.c_fc",
                                                     "transformer.h.1.mlp.c_proj"]
    # A second inject (another method elsewhere) leaves the first adapters in place.
    adapterops.inject(model, config_for("lamda", target_modules=["down_proj"]))
    kinds = {n: type(m).__name__ for n, m in adapter_layers(model)}
    assert kinds["model.layers.0.self_attn.q_proj"] == "FusedLoRALinear"
    assert kinds["model.layers.1.mlp.down_proj"] == "FusedLaMDALinear"
    assert len(kinds) == 6, kinds


def test_hdpissa_convert_is_inject():
    names = ("q_proj", "v_proj")
    converted = adapterops.hdpissa.convert(build("llama"), RANK, ALPHA, world_size=2,
                                           rank_index=1, target_modules=names)
    config = adapterops.AdapterConfig(method="hdpissa", rank=RANK, alpha=ALPHA,
                                      target_modules=list(names), world_size=2, rank_index=1,
                                      svd="full", niter=8)
    assert converted.adapterops_config == config
    injected = adapterops.inject(build("llama"), config)
    got, want = adapter_layers(converted), adapter_layers(injected)
    assert [n for n, _ in got] == [n for n, _ in want] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in names]
    for (name, a), (_, b) in zip(got, want):
        assert a.rank_index == 1 and a.world_size == 2, name
        for key, tensor in b.state_dict().items():
            assert torch.equal(a.state_dict()[key], tensor), f"{name}.{key} differs from inject's"
    assert adapterops.trainable_parameters(converted) == adapterops.trainable_parameters(injected)


# --- 8. AdapterConfig JSON round trip ---------------------------------------------------------

@pytest.mark.parametrize("config", [
    *(config_for(case) for case in CASES),
    config_for("lora", init="pissa_niter_4", dropout=0.1, target_modules=("q_proj", "v_proj"),
               backend="torch"),
    config_for("hydra", top_k=1, dropout=0.05, target_modules=r".*\.mlp\..*"),
    config_for("hdpissa", svd="lowrank", niter=2, target_modules="all-linear"),
], ids=lambda c: f"{c.method}-{c.init or ''}-{type(c.target_modules).__name__}")
def test_adapter_config_json_round_trip(config):
    text = config.to_json()
    data = json.loads(text)
    assert sorted(data) == sorted(f.name for f in dataclasses.fields(adapterops.AdapterConfig))
    again = adapterops.AdapterConfig.from_json(text)
    assert again == config and again.to_json() == text
    assert adapterops.AdapterConfig.from_dict(config.to_dict()) == config
    if isinstance(config.target_modules, list):
        assert data["target_modules"] == list(config.target_modules)
