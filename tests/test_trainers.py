"""Checkpoints and resume under the trainers people use: transformers' Trainer, TRL's
SFTTrainer and accelerate, on a config-built 1-layer LLaMA injected with every method.

A run of STEPS optimizer steps checkpoints every SAVE steps (save_strategy "steps",
save_total_limit, evaluation and load_best_model_at_end). A second run, built the same way,
resumes from its step-SAVE checkpoint and must log the same losses after it and end with the
same tensors (`torch.equal`, CPU, fixed seeds). Also: LaMDA's B-freeze callback across a
resume, HydraLoRA's balance loss in the Trainer's loss and under activation checkpointing,
HD-PiSSA's optimizer passed as `optimizers=`.
"""
import pytest
import torch

import adapterops
from adapterops.hdpissa import HDPiSSAOptimizer
from adapterops.inject import adapter_layers

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
accelerate = pytest.importorskip("accelerate")
from adapterops.integrations.transformers import (  # noqa: E402
    BalanceLossMixin, LaMDABFreezeCallback, add_balance_loss)

VOCAB, STEPS, SAVE, BATCH = 64, 4, 2, 4
TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "lora": dict(method="lora", dropout=0.05),   # PEFT's usual lora_dropout: the RNG must resume too
    "pissa": dict(method="lora", init="pissa"),
    "lamda_svd": dict(method="lamda", init="svd"),
    "hydra": dict(method="hydra", num_heads=2, balance_loss_weight=0.05, dropout=0.05),
    "hdpissa": dict(method="hdpissa", world_size=1, rank_index=0),
}
_gen = torch.Generator().manual_seed(3)
TOKENS = torch.randint(3, VOCAB, (STEPS * BATCH + BATCH, 8), generator=_gen)


def build(case: str, hook: bool = True, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    fields = {"target_modules": TARGETS, **CASES[case], **overrides}
    model = adapterops.inject(model, adapterops.AdapterConfig(rank=4, alpha=8, **fields))
    if hook and fields.get("balance_loss_weight", 0) > 0:
        add_balance_loss(model)
    return model


def tokenizer():
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t1", eos_token="t2")


def training_args(cls, output_dir):
    return cls(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH,
               per_device_eval_batch_size=BATCH, learning_rate=1e-2, save_steps=SAVE,
               save_total_limit=2, eval_strategy="steps", eval_steps=SAVE, load_best_model_at_end=True,
               report_to=[], use_cpu=True, logging_steps=1, seed=0, disable_tqdm=True)


class HydraSFTTrainer(BalanceLossMixin, trl.SFTTrainer):
    pass


def make_trainer(kind: str, case: str, output_dir, mixin: bool = False, **overrides):
    model = build(case, hook=not mixin, **overrides)
    extra = {}
    if case == "hdpissa":
        optimizer = HDPiSSAOptimizer(model, lr=1e-2)
        extra["optimizers"] = (optimizer, transformers.get_linear_schedule_with_warmup(optimizer, 0, STEPS))
    if case.startswith("lamda"):
        extra["callbacks"] = [LaMDABFreezeCallback(eta=1.0)]
    train, evaluation = TOKENS[:STEPS * BATCH], TOKENS[STEPS * BATCH:]
    if kind == "trainer":
        rows = lambda ids: [{"input_ids": t, "labels": t} for t in ids]  # noqa: E731
        return transformers.Trainer(model=model, args=training_args(transformers.TrainingArguments, output_dir),
                                    train_dataset=rows(train), eval_dataset=rows(evaluation), **extra)
    rows = lambda ids: datasets.Dataset.from_dict({"input_ids": ids.tolist()})  # noqa: E731
    return (HydraSFTTrainer if mixin else trl.SFTTrainer)(
        model=model, args=training_args(trl.SFTConfig, output_dir),
        train_dataset=rows(train), eval_dataset=rows(evaluation), processing_class=tokenizer(), **extra)


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def assert_same_tensors(what: str, got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), f"{what}: keys differ"
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {differ[:4]} differ"


def check_resume(kind: str, case: str, tmp_path, **options):
    """The uninterrupted run, then a run resumed from its step-SAVE checkpoint (copied, so the
    first run's later checkpoints cannot leak in): same losses after SAVE, same tensors."""
    import shutil
    full = make_trainer(kind, case, tmp_path / "full", **options)
    full.train()
    shutil.copytree(tmp_path / "full" / f"checkpoint-{SAVE}", tmp_path / "resumed" / f"checkpoint-{SAVE}")
    resumed = make_trainer(kind, case, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=True)
    after = {s: v for s, v in losses(full).items() if s > SAVE}
    assert after and {s: losses(resumed)[s] for s in after} == after, (
        f"{kind}/{case}: losses after resuming {losses(resumed)} vs uninterrupted {losses(full)}")
    assert_same_tensors(f"{kind}/{case}: the final models", resumed.model.state_dict(), full.model.state_dict())
    safetensors = pytest.importorskip("safetensors.torch")
    last = [safetensors.load_file(str(tmp_path / run / f"checkpoint-{STEPS}" / "model.safetensors"))
            for run in ("full", "resumed")]
    assert_same_tensors(f"{kind}/{case}: the step-{STEPS} checkpoints", last[1], last[0])
    return full, resumed


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_checkpoints_and_resumes_exactly(case, tmp_path):
    full, _ = check_resume("trainer", case, tmp_path)
    assert full.state.best_model_checkpoint is not None
    loaded = adapterops.load_pretrained(full.state.best_model_checkpoint)
    assert [n for n, _ in adapter_layers(loaded)] == [n for n, _ in adapter_layers(full.model)]
    with pytest.raises(ValueError, match="adapterops.load_pretrained"):
        transformers.LlamaForCausalLM.from_pretrained(full.state.best_model_checkpoint)


@pytest.mark.parametrize("case", list(CASES))
def test_sft_trainer_checkpoints_and_resumes_exactly(case, tmp_path):
    # TRL's fused LM head drops the output's loss: HydraLoRA's balance loss comes in through
    # BalanceLossMixin there.
    full, _ = check_resume("sft", case, tmp_path, mixin=case == "hydra")
    if case == "hydra":
        without = make_trainer("sft", case, tmp_path / "without", balance_loss_weight=0.0)
        without.train()
        # The same first batch and weights: the first loss differs by the three layers'
        # weighted balance losses (each >= 0.05: the Switch loss is >= 1).
        assert losses(full)[1] - losses(without)[1] >= 3 * 0.05 - 1e-6


def test_sft_trainer_refuses_to_drop_the_balance_loss(tmp_path):
    trainer = make_trainer("sft", "hydra", tmp_path)
    with pytest.raises(RuntimeError, match="SFTTrainer.*BalanceLossMixin"):
        trainer.train()


def test_lamda_callback_freezes_b_by_the_trainer_step_across_a_resume(tmp_path):
    """eta = 1, rank 4, T = 4: after step t the first t columns of B are frozen, B entirely at
    the end. The resumed run freezes as the uninterrupted one (check_resume) and its state is
    in trainer_state.json."""
    import json
    full, resumed = check_resume("trainer", "lamda_svd", tmp_path)
    state = json.loads((tmp_path / "full" / f"checkpoint-{SAVE}" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["LaMDABFreezeCallback"] == {
        "args": {"eta": 1.0, "total_steps": None}, "attributes": {"steps_taken": SAVE}}
    initial = build("lamda_svd")
    for (name, layer), (_, start) in zip(adapter_layers(resumed.model), adapter_layers(initial)):
        assert layer.lora_B_frozen, name
        assert not torch.equal(layer.lora_B, start.lora_B), f"{name}: B never trained"
    with pytest.raises(ValueError, match="eta"):
        LaMDABFreezeCallback(eta=0.0)


def test_balance_loss_reaches_the_trainer_loss():
    model = build("hydra", dropout=0.0).train()
    ids = TOKENS[:BATCH]
    out = model(input_ids=ids, labels=ids)
    handle = model._adapterops_balance_hook
    handle.remove()
    plain = model(input_ids=ids, labels=ids)
    balance = adapterops.hydra.collect_balance_loss(model)
    assert balance > 0
    assert torch.equal(out.loss, plain.loss + balance)
    assert add_balance_loss(model) is not handle
    with pytest.raises(ValueError, match="balance_loss_weight > 0"):
        add_balance_loss(build("lora"))


@pytest.mark.parametrize("reentrant", [False, True])
def test_hydra_balance_loss_under_activation_checkpointing(reentrant):
    """Non-reentrant: the same loss and gradients as without checkpointing (the router's
    balance gradient included), and no loss left in the layers after the recompute.
    Reentrant: its first pass runs without autograd; a clear error, not a router without its
    balance gradient."""
    ids = TOKENS[:BATCH]

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        params = [p for p in model.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params)

    model = build("hydra", dropout=0.0).train()
    loss, grads = loss_and_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
            loss_and_grads(model)
        return
    loss_ckpt, grads_ckpt = loss_and_grads(model)
    assert torch.equal(loss_ckpt, loss)
    for got, want in zip(grads_ckpt, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(torch.float32).eps * want.abs().max())
    stale = [n for n, m in model.named_modules() if getattr(m, "last_balance_loss", None) is not None]
    assert not stale, f"balance losses left after the recompute: {stale}"


@pytest.mark.parametrize("case", list(CASES))
def test_accelerate_save_state_and_load_state_resume_exactly(case, tmp_path):
    """accelerate's own loop: save_state at step SAVE, a fresh model and optimizer load_state
    and take the remaining steps; the same losses and tensors as the uninterrupted loop."""
    def run(resume: bool):
        accelerate.utils.set_seed(0)
        model = build(case)
        optimizer = (HDPiSSAOptimizer(model, lr=1e-2) if case == "hdpissa" else
                     torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
        accelerator = accelerate.Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        start = SAVE if resume else 0
        if resume:
            accelerator.load_state(str(tmp_path / "state"))
        seen = []
        for step in range(start, STEPS):
            ids = TOKENS[step * BATCH:(step + 1) * BATCH]
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            seen.append(loss.item())
            if not resume and step + 1 == SAVE:
                accelerator.save_state(str(tmp_path / "state"))
        return seen, model.state_dict()

    full_losses, full_state = run(resume=False)
    resumed_losses, resumed_state = run(resume=True)
    assert resumed_losses == full_losses[SAVE:], f"{case}: {resumed_losses} vs {full_losses}"
    assert_same_tensors(f"accelerate/{case}", resumed_state, full_state)


def test_resuming_into_a_model_with_other_adapters_raises(tmp_path):
    """The Trainer loads a checkpoint with strict=False: adapter tensors of other layers (or
    none at all) must not pass as a resume."""
    trainer = make_trainer("trainer", "lora", tmp_path / "run")
    trainer.train()
    checkpoint = str(tmp_path / "run" / f"checkpoint-{SAVE}")
    other = make_trainer("trainer", "lora", tmp_path / "other", target_modules=["q_proj", "k_proj"])
    with pytest.raises(RuntimeError, match=r"missing \[.*k_proj.lora_A.*unexpected \[.*v_proj.lora_A"):
        other.train(resume_from_checkpoint=checkpoint)
    model = build("lora")
    model.load_state_dict(trainer.model.state_dict())   # the same layout loads as before
    base = transformers.LlamaForCausalLM(build("lora").config).state_dict()
    with pytest.raises(RuntimeError, match="adapter tensors missing"):
        model.load_state_dict(base, strict=False)       # a plain model's state: no adapters
