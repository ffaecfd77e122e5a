"""adapterops.peft against PEFT itself, on config-built tiny LLaMA and GPT-2 (Conv1D) models:
export loaded by PEFT, PEFT adapters loaded into our layers, and `fuse` of a PEFT model, each
compared with PEFT's own path (outputs and gradients), plus the options we refuse."""
import contextlib
import copy
import json
from unittest import mock

import pytest
import torch
from torch import nn

import adapterops
import adapterops.peft as ap
from utils import assert_close_to_reference

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
# fp32 logits of a 2-layer model through different but equivalent compositions
ATOL = 2e-6


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _perturb_trainable(model, seed=1):
    """Moves every trainable tensor off its init (LoRA's B = 0 would hide a wrong B)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _assert_close(name, actual, expected, atol=ATOL):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{name}: max abs difference {err:.3e} > {atol:.1e}"


def _grads(model, keyword):
    return {n: p.grad.clone() for n, p in model.named_parameters() if keyword in n and p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method,init", [("lora", "lora"), ("lora", "pissa"), ("lamda", "lora"),
                                         ("lamda", "svd")])
def test_export_loads_in_peft_to_the_same_outputs(kind, method, init, tmp_path):
    model = adapterops.inject(tiny(kind), adapterops.AdapterConfig(
        method=method, rank=4, alpha=8, target_modules=TARGETS[kind], init=init))
    _perturb_trainable(model)
    expected = model(IDS).logits
    ap.export(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (kind == "gpt2")
    # PiSSA and LaMDA "svd" rewrote W: their PEFT form on the original W has rank 2r.
    assert config["r"] == (8 if init != "lora" else 4), config["r"]
    loaded = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
    _assert_close(f"{kind} {method}/{init} PEFT logits", loaded(IDS).logits, expected)


def test_export_per_layer_ranks_use_peft_patterns(tmp_path):
    model = tiny("llama")
    adapterops.inject(model, adapterops.AdapterConfig(method="lamda", rank=4, alpha=8,
                                                      target_modules=["q_proj"]))
    adapterops.inject(model, adapterops.AdapterConfig(method="lora", rank=2, alpha=6,
                                                      target_modules=["v_proj"]))
    _perturb_trainable(model)
    expected = model(IDS).logits
    ap.export(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"], config
    loaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path).eval()
    _assert_close("per-layer ranks", loaded(IDS).logits, expected)


@pytest.mark.parametrize("config", [dict(method="hydra", num_heads=2),
                                    dict(method="hdpissa", world_size=2, rank_index=0)])
def test_export_refuses_layers_without_a_lora_form(config, tmp_path):
    model = adapterops.inject(tiny("llama"), adapterops.AdapterConfig(
        rank=2, alpha=4, target_modules=["q_proj"], **config))
    with pytest.raises(ValueError, match=r"no PEFT LoRA form: model\.layers\.0\.self_attn\.q_proj"):
        ap.export(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def _peft_model(kind, **options):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                             fan_in_fan_out=kind == "gpt2", **options)
    model = peft.get_peft_model(tiny(kind), config)
    _perturb_trainable(model)
    return model.eval()


@pytest.mark.parametrize("kind,options", [
    ("llama", {}),
    ("llama", {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    ("gpt2", {}),
])
def test_peft_adapter_loads_into_fused_layers(kind, options, tmp_path):
    reference = _peft_model(kind, **options)
    reference.save_pretrained(tmp_path)
    ours = ap.load(tiny(kind), tmp_path)
    layers = [m for m in ours.modules() if isinstance(m, adapterops.FusedLoRALinear)]
    assert len(layers) == 2 * len(TARGETS[kind])
    out_ref = reference(IDS, labels=IDS)
    out = ours(IDS, labels=IDS)
    _assert_close(f"{kind} {options} logits", out.logits, out_ref.logits)
    out_ref.loss.backward()
    out.loss.backward()
    for name, grad in _grads(reference, "lora_").items():
        # base_model.model.X.lora_A.default.weight -> X.lora_A
        ours_name = name.removeprefix("base_model.model.").replace(".default.weight", "")
        _assert_close(f"{kind} grad {ours_name}", ours.get_parameter(ours_name).grad, grad)


@pytest.mark.parametrize("options,match", [({"use_dora": True}, "use_dora"),
                                           ({"bias": "all"}, "bias"),
                                           ({"lora_bias": True}, "lora_bias")])
def test_load_refuses_what_it_cannot_represent(options, match, tmp_path):
    _peft_model("llama", **options).save_pretrained(tmp_path)
    base = tiny("llama")
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=match):
        ap.load(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_load_names_missing_tensors_and_other_formats(tmp_path):
    _peft_model("llama").save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        ap.load(tiny("llama"), tmp_path)
    ours = adapterops.inject(tiny("llama"), adapterops.AdapterConfig(method="lora", rank=2, alpha=4))
    adapterops.save_adapters(ours, tmp_path / "ours")
    with pytest.raises(ValueError, match="adapterops.load_adapters"):
        ap.load(tiny("llama"), tmp_path / "ours")
    with pytest.raises(ValueError, match="adapterops.peft.load"):
        adapterops.load_adapters(tiny("llama"), tmp_path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fuse_runs_peft_lora_on_our_op_with_the_same_results(kind, tmp_path):
    reference = _peft_model(kind)
    fused = copy.deepcopy(reference)
    assert ap.fuse(fused) == {}
    names = [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in fused.named_parameters()] == names
    calls = []
    real = ap.lowrank_linear
    with mock.patch.object(ap, "lowrank_linear", lambda *a, **k: calls.append(1) or real(*a, **k)):
        out = fused(IDS, labels=IDS)
    assert len(calls) == 2 * len(TARGETS[kind]), "every LoRA layer must run on lowrank_linear"
    assert ap.fallbacks(fused) == {}
    out_ref = reference(IDS, labels=IDS)
    _assert_close(f"{kind} fused logits", out.logits, out_ref.logits)
    out.loss.backward()
    out_ref.loss.backward()
    fused_grads = _grads(fused, "lora_")
    assert fused_grads.keys() == _grads(reference, "lora_").keys()
    for name, grad in _grads(reference, "lora_").items():
        _assert_close(f"{kind} fused grad {name}", fused_grads[name], grad)
    # PEFT's own machinery keeps working: disabling, saving, loading, merging.
    with fused.disable_adapter():
        _assert_close("disabled", fused(IDS).logits, tiny(kind)(IDS).logits)
    fused.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
    _assert_close("saved and loaded", again(IDS).logits, out_ref.logits)
    merged = fused.merge_and_unload()
    _assert_close("merged", merged(IDS).logits, out_ref.logits)


def test_fuse_falls_back_where_peft_would_differ_and_reports_what_it_leaves():
    dora = _peft_model("llama", use_dora=True)
    left = ap.fuse(dora)
    assert len(left) == 6 and all("DoRA" in reason for reason in left.values()), left
    custom = _peft_model("llama", lora_dropout=0.5)
    for layer in _lora_layers(custom):
        layer.lora_dropout["default"] = nn.AlphaDropout(0.5)
    left = ap.fuse(custom)  # fused, but every training call runs PEFT's forward: reported
    assert len(left) == 6 and all(r == "lora_dropout is a AlphaDropout, not nn.Dropout: every "
                                  "training call runs PEFT's forward" for r in left.values()), left
    calls = []
    real = ap.lowrank_linear
    with mock.patch.object(ap, "lowrank_linear", lambda *a, **k: calls.append(1) or real(*a, **k)):
        custom.train()
        why = "runs PEFT's forward, not the fused op: lora_dropout is a AlphaDropout"
        with pytest.warns(UserWarning, match=why) as caught:
            custom(IDS)  # a dropout the kernels do not draw: PEFT's path
        assert not calls and len(caught) == 6  # one warning per layer
        custom(IDS)  # counted again, no second warning
        custom.eval()
        custom(IDS)
        assert len(calls) == 6
    reason = "lora_dropout is a AlphaDropout, not nn.Dropout, in training"
    assert ap.fallbacks(custom) == {name: {reason: 2} for name in left}
    with custom.disable_adapter():
        custom.train()
        custom(IDS)  # the base layer alone: no fallback
    assert ap.fallbacks(custom) == {name: {reason: 2} for name in left}
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        ap.fuse(tiny("llama"))


def _lora_layers(model):
    from peft.tuners.lora.layer import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_fuse_runs_peft_lora_dropout_fused():
    """lora_dropout=0.05, the usual recipe: every training call runs fused, with the dropout
    drawn in the kernels (the seed from torch's generator: manual_seed replays it), and an
    eval call drops nothing."""
    model = _peft_model("llama", lora_dropout=0.05)
    for layer in _lora_layers(model):  # B != 0, so that the dropout shows in the output
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    assert ap.fuse(model) == {}
    calls = []
    real = ap.lowrank_linear
    with mock.patch.object(ap, "lowrank_linear",
                           lambda *a, **k: calls.append(k["dropout"]) or real(*a, **k)):
        model.train()
        torch.manual_seed(3)
        first = model(IDS, labels=IDS)
        first.loss.backward()
        torch.manual_seed(3)
        again = model(IDS).logits
        other = model(IDS).logits
        model.eval()
        evaluated = model(IDS).logits
    assert calls == [0.05] * 18 + [0.0] * 6
    assert ap.fallbacks(model) == {}
    assert torch.equal(first.logits, again)
    assert not torch.equal(first.logits, other) and not torch.equal(first.logits, evaluated)
    grads = _grads(model, "lora_")
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def _fused_matches_peft_against_float64(reference, targets, where: str, context=contextlib.nullcontext):
    """fuse a copy of the PEFT model `reference`, run both on a training batch (inside
    `context()`), check that every LoRA call ran fused, and judge the fused logits and LoRA
    gradients by the 2x-error rule of PEFT's own run against a float64 copy. Returns the
    fused model's LoRA gradients."""
    _perturb_trainable(reference)
    fused, exact = copy.deepcopy(reference), copy.deepcopy(reference).double()
    assert ap.fuse(fused) == {}
    outs, calls, real = {}, [], ap.lowrank_linear
    with mock.patch.object(ap, "lowrank_linear", lambda *a, **k: calls.append(1) or real(*a, **k)):
        for name, model in (("peft", reference), ("fused", fused)):
            with context():
                outs[name] = model(IDS, labels=IDS)
            outs[name].loss.backward()
    assert len(calls) == 2 * len(targets) and ap.fallbacks(fused) == {}
    out64 = exact(IDS, labels=IDS)
    out64.loss.backward()
    assert_close_to_reference(f"{where} logits", outs["fused"].logits, out64.logits, outs["peft"].logits)
    fused_grads, peft_grads = _grads(fused, "lora_"), _grads(reference, "lora_")
    for name, grad64 in _grads(exact, "lora_").items():
        assert_close_to_reference(f"{where} grad {name}", fused_grads[name], grad64, peft_grads[name])
    return fused_grads


def test_fuse_runs_peft_fp32_adapters_on_a_bf16_base():
    """PEFT keeps a 16-bit base's adapters in fp32 (autocast_adapter_dtype=True, its default):
    every call runs fused, the low-rank path in fp32 as PEFT computes it, within the 2x-error
    rule of PEFT's own run against float64; the adapters' gradients are fp32."""
    reference = peft.get_peft_model(tiny("llama").to(torch.bfloat16),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    grads = _fused_matches_peft_against_float64(reference, TARGETS["llama"], "bf16 base")
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_fuse_reports_adapters_in_a_dtype_the_op_does_not_take_and_counts_their_calls():
    """fp16 adapters on a bf16 base: PEFT runs them, the op does not; fuse says so."""
    model = peft.get_peft_model(tiny("llama").to(torch.bfloat16),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    for layer in _lora_layers(model):
        layer.lora_A["default"].half()
        layer.lora_B["default"].half()
    left = ap.fuse(model)
    assert len(left) == 6 and all(r.startswith("mixed dtypes (weight torch.bfloat16, lora_A "
                                               "torch.float16, lora_B torch.float16)")
                                  for r in left.values()), left
    with pytest.warns(UserWarning, match="mixed dtypes"):
        model(IDS)
    counts = ap.fallbacks(model)
    assert counts.keys() == left.keys()
    assert all(c == {"mixed dtypes (x torch.bfloat16, weight torch.bfloat16, lora_A torch.float16, "
                     "lora_B torch.float16)": 1} for c in counts.values()), counts


def test_fuse_serves_autocast_inputs():
    """Under autocast (SFTConfig(bf16=True) on an fp32 model) the inputs of o_proj and down_proj
    arrive in bf16 while W is fp32: the op casts them as PEFT's F.linear calls do, so every
    call runs fused, within the 2x-error rule of PEFT's own autocast run against float64."""
    targets = ["q_proj", "o_proj", "down_proj"]
    reference = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _fused_matches_peft_against_float64(reference, targets, "autocast",
                                        lambda: torch.autocast("cpu", dtype=torch.bfloat16))
