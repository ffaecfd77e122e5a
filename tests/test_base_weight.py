"""Quantized base weights: `adapterops.ops.base_weight.NF4Weight` decodes bitsandbytes' 4-bit
layout bit for bit as `bitsandbytes.functional.dequantize_4bit` does, on the Triton kernel
(under the interpreter on CPU) and in PyTorch (NF4 and FP4, with and without double
quantization, every output dtype, sizes that leave a partial block and an odd element count).
`inject` refuses a 4-bit base with an error that names it (HD-PiSSA for good: it trains W), and
`fuse` leaves a PEFT layer on one to PEFT.
"""
import pytest
import torch
from torch import nn

import adapterops
from adapterops.ops.base_weight import NF4Weight



@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, imported by the tests that use it, not at collection (it registers its
    own torch ops and looks for HF kernels when imported)."""
    return pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bnb_functional(bnb):
    import bitsandbytes.functional
    return bitsandbytes.functional


@pytest.mark.parametrize("shape", [(33, 70), (1, 1), (7, 9), (64, 128)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dequantize_matches_bitsandbytes_bit_for_bit(bnb_functional, shape, double_quant, quant_type, dtype,
                                                     backend):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 100 + shape[1])).to(dtype)
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    weight = NF4Weight(packed=packed.reshape(-1), absmax=state.absmax, code=state.code,
                       shape=tuple(state.shape), blocksize=state.blocksize, dtype=state.dtype,
                       quant_type=quant_type,
                       absmax_code=state.state2.code if double_quant else None,
                       absmax_scale=state.state2.absmax if double_quant else None,
                       offset=float(state.offset) if double_quant else 0.0)
    want = bnb_functional.dequantize_4bit(packed, state)
    got = weight.dequantize(backend=backend)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max()}"
    assert (got.float() - W.float()).abs().max() <= W.float().abs().max() / 4   # it did quantize


@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_from_bnb_reads_a_linear4bit(bnb, bnb_functional, blocksize):
    layer = bnb.nn.Linear4bit(70, 33, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True, quant_storage=torch.uint8)
    layer.weight = bnb.nn.Params4bit(torch.randn(33, 70), requires_grad=False, quant_type="nf4",
                                     blocksize=blocksize, compress_statistics=True).to("cpu")
    weight = NF4Weight.from_bnb(layer.weight)
    assert weight.double_quant and weight.blocksize == blocksize and weight.shape == (33, 70)
    assert weight.packed.data_ptr() == layer.weight.data_ptr(), "from_bnb copied the packed weight"
    assert torch.equal(weight.dequantize(), bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    with pytest.raises(TypeError, match="Params4bit"):
        NF4Weight.from_bnb(torch.randn(3, 3))
    with pytest.raises(ValueError, match="backend 'cuda' was forced for dequant .*does not implement op 'dequant'"):
        weight.dequantize(backend="cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        weight.dequantize(torch.int8)


def test_nf4_weight_names_what_does_not_fit(bnb_functional):
    packed, state = bnb_functional.quantize_4bit(torch.randn(8, 16), blocksize=64, quant_type="nf4")
    fields = dict(packed=packed.reshape(-1), absmax=state.absmax, code=state.code, shape=(8, 16),
                  blocksize=64, dtype=torch.float32)
    NF4Weight(**fields)
    for change, match in [(dict(shape=(8, 18)), "packed must be torch.uint8 with 72 elements"),
                          (dict(blocksize=48), "blocksize must be one of"),
                          (dict(absmax=state.absmax.half()), "absmax must be torch.float32"),
                          (dict(absmax_code=state.code), "needs both absmax_code and absmax_scale"),
                          (dict(dtype=torch.int8), "dtype must be one of"),
                          (dict(quant_type="int4"), "quant_type")]:
        with pytest.raises(ValueError, match=match):
            NF4Weight(**{**fields, **change})


@pytest.mark.parametrize("config,match", [
    (dict(method="lora"), "4-bit and 8-bit bitsandbytes bases are not served yet"),
    (dict(method="hydra", num_heads=2), "4-bit and 8-bit bitsandbytes bases are not served yet"),
    (dict(method="hdpissa", world_size=1, rank_index=0), "HD-PiSSA trains W itself"),
])
def test_inject_refuses_a_4bit_base_naming_it(bnb, config, match):
    quantized = bnb.nn.Linear4bit(70, 33, quant_type="nf4").to("cpu")
    model = nn.Sequential(nn.Linear(70, 70), quantized)
    named = r"layer 1: a Linear4bit with a torch.uint8 weight .* 33 x 70: a quantized base; .*"
    with pytest.raises(TypeError, match=named + match):
        adapterops.inject(model, adapterops.AdapterConfig(rank=4, alpha=8, **config))
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad, "inject changed the model"


def test_fuse_leaves_a_peft_layer_on_a_4bit_base_to_peft_even_under_autocast(bnb):
    """PEFT wraps a Linear4bit base (on CPU in its generic LoRA Linear): fuse reports it and
    every call, autocast included (the usual bf16 QLoRA recipe), runs PEFT's forward, with
    PEFT's result, instead of handing the packed bytes to the fused op."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import warnings

    import adapterops.peft as fused_peft

    def qlora_model():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2))
        attention = model.model.layers[0].self_attn
        quantized = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(attention.q_proj.weight.data.clone(), requires_grad=False,
                                             quant_type="nf4").to("cpu")
        attention.q_proj = quantized
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    reference, fused = qlora_model(), qlora_model()
    left = fused_peft.fuse(fused)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert list(left) == [name] and "a quantized base weight" in left[name], left
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # fuse's one-time fallback notice
        assert torch.equal(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert list(fused_peft.fallbacks(fused)) == [name], "v_proj (dense) ran fused, q_proj fell back"
