"""lorakit inside transformers' Trainer: adapter checkpoints, exact resume, training hooks, LoRA+,
gradient checkpointing, inference paths (tiny random models, a few steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.errors import LorakitError
from lorakit.integrations import LorakitCallback, lorakit_trainer
from lorakit.integrations.checkpoints import EXACT_STATE_NAME, HOOKS_STATE_NAME
from trainer_runs import adapter_tensors, method_config, token_data, training_args

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

FULL_MODEL_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def run(model, out: Path, trainer_class=None, callbacks=None, resume=None, **overrides):
    trainer_class = trainer_class or lorakit_trainer(Trainer)
    trainer = trainer_class(
        model=model, args=training_args(out, **overrides), train_dataset=token_data(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class GradientRecorder(TrainerCallback):
    """The adapters' gradients right before each optimizer step (after the backward passes)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor | None]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in lorakit.adapter_parameters(model)}
        )


# --- 1. checkpoints hold the adapter ------------------------------------------------------------------


@pytest.mark.parametrize("plain", [False, True], ids=["lorakit-trainer", "plain-trainer+callback"])
def test_checkpoints_hold_the_adapter_not_the_model(tmp_path, plain):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    trainer = run(
        model,
        tmp_path,
        trainer_class=Trainer if plain else None,
        callbacks=[LorakitCallback()],
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    for step in (2, 4):
        files = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "lorakit.json",
            EXACT_STATE_NAME,
            HOOKS_STATE_NAME,
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
        } <= files, files
        assert not files & set(FULL_MODEL_FILES), files
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "lorakit.json"} <= files
    assert not files & set(FULL_MODEL_FILES)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_save_model_is_what_peft_and_lorakit_load(tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    model = lorakit.adapt(tiny_llama(), method_config("lora", alpha=8.0))
    trainer = run(model, tmp_path, max_steps=3)
    trainer.save_model(str(tmp_path / "adapter"))
    model.eval()
    expected = model(input_ids).logits
    assert not torch.allclose(expected, tiny_llama()(input_ids).logits, atol=1e-4)  # it trained
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    reloaded = lorakit.load(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_a_merged_model_saves_in_full(tmp_path, input_ids):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    run(model, tmp_path, max_steps=2)
    expected = model.eval()(input_ids).logits
    lorakit.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")  # no adapter left: the model itself
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_callback_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(LorakitError, match="no lorakit adapter"):
        Trainer(
            model=tiny_llama(), args=training_args(tmp_path), train_dataset=token_data(), callbacks=[LorakitCallback()]
        )


# --- 2. exact resume ----------------------------------------------------------------------------------

RESUME_CASES = {
    "lora-dropout": ("lora", {"dropout": 0.1}),  # the random state is part of what a resume restores
    "adalora": ("adalora", {}),  # ranks decided at step 6, after the checkpoint at 4; importance averages
    "adalora-after-allocation": ("adalora", {"tfinal": 5}),  # ranks decided at step 3, before the checkpoint
    "delta-lora": ("delta-lora", {}),  # the moved base and the previous factors
    "lora-drop": ("lora-drop", {}),  # the plan (shared pairs) decided before step 1
}


class HookStateRecorder(LorakitCallback):
    """The training hooks' state after each optimizer step."""

    def __init__(self):
        super().__init__()
        self.by_step: dict[int, list] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = [
            {k: (dict(v) if isinstance(v, dict) else v) for k, v in hook.items()} for hook in self.hooks.state_dict()
        ]


def interrupted_and_whole(tmp_path, method, overrides):
    """(model after 8 steps in one run, model after resuming that run's step-4 checkpoint, and each
    run's hook states by step)."""
    whole = lorakit.adapt(tiny_llama(), method_config(method, **overrides))
    whole_hooks = HookStateRecorder()
    run(whole, tmp_path / "whole", callbacks=[whole_hooks], save_strategy="steps", save_steps=4)
    resumed = lorakit.adapt(tiny_llama(), method_config(method, **overrides))  # the script, run again
    resumed_hooks = HookStateRecorder()
    run(resumed, tmp_path / "resumed", callbacks=[resumed_hooks], resume=str(tmp_path / "whole" / "checkpoint-4"))
    return whole, resumed, whole_hooks.by_step, resumed_hooks.by_step


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_ends_equal_to_an_uninterrupted_run(tmp_path, case):
    method, overrides = RESUME_CASES[case]
    whole, resumed, whole_hooks, resumed_hooks = interrupted_and_whole(tmp_path, method, overrides)
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    decided = lorakit.inject.adapter_config(whole)
    assert {f: getattr(lorakit.inject.adapter_config(resumed), f) for f in decided.layout_fields} == {
        f: getattr(decided, f) for f in decided.layout_fields
    }  # the layout training decided, too
    selection = ("targets", "layers", "exclude")  # as the script chose them, not the modules they matched
    assert {f: getattr(lorakit.inject.adapter_config(resumed), f) for f in selection} == {
        f: getattr(decided, f) for f in selection
    }
    assert sorted(resumed_hooks) == [5, 6, 7, 8]
    for step in resumed_hooks:  # and the hooks went through the same states
        assert same_state(resumed_hooks[step], whole_hooks[step]), step


@pytest.mark.parametrize("broken", ["no-restore", "no-hook-state", "no-exact-state"])
def test_resume_without_the_restore_goes_elsewhere(tmp_path, monkeypatch, broken):
    """Each part of the restore is needed: without it the resumed AdaLoRA run goes elsewhere (or stops)."""
    from lorakit.integrations import checkpoints
    from lorakit.integrations import trainer as trainer_module

    real = checkpoints.restore_checkpoint
    overrides = {}
    if broken == "no-restore":  # what a plain Trainer would do with an adapter-only checkpoint, at best
        monkeypatch.setattr(trainer_module.LorakitTrainerMixin, "_load_from_checkpoint", lambda self, *a, **k: None)
    elif broken == "no-hook-state":
        monkeypatch.setattr(trainer_module, "restore_checkpoint", lambda *a, **k: (real(*a, **k), None)[1])
    else:  # after the final allocation (step 3): the pruned triplets are in the exact state only
        monkeypatch.setattr(checkpoints, "load_exact_adapter_state", lambda model, saved: None)
        overrides = {"tfinal": 5}
    try:
        whole, resumed, whole_hooks, resumed_hooks = interrupted_and_whole(tmp_path, "adalora", overrides)
    except LorakitError as err:  # refusing to go on is also not ending equal
        assert broken == "no-restore" and "hooks' state" in str(err)
        return
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    ended_elsewhere = any(not torch.equal(expected[k], got[k]) for k in expected)
    went_elsewhere = any(not same_state(resumed_hooks[s], whole_hooks[s]) for s in resumed_hooks)
    assert ended_elsewhere or (broken == "no-hook-state" and went_elsewhere)


def test_resume_needs_the_adapters_on_the_model(tmp_path):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    run(model, tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    other = lorakit.adapt(tiny_llama(), method_config("lora"), name="other")
    with pytest.raises(LorakitError, match="does not have"):
        run(other, tmp_path / "b", max_steps=4, resume=str(tmp_path / "a" / "checkpoint-2"))


# --- 3. training hooks run inside the trainer ---------------------------------------------------------


def test_adalora_allocates_over_the_trainers_run_length(tmp_path):
    model = lorakit.adapt(tiny_llama(), method_config("adalora"))
    trainer = run(model, tmp_path, max_steps=-1, num_train_epochs=1)  # 32 examples / 4 = 8 steps, from the state
    config = lorakit.inject.adapter_config(model)
    assert trainer.state.max_steps == 8 and config.total_step == 8
    assert config.rank_pattern and sum(sum(k) for k in config.rank_pattern.values()) == config.target_r * 6
    logged = [entry["extra_loss"] for entry in trainer.state.log_history if "extra_loss" in entry]
    assert len(logged) == 4 and all(value > 0 for value in logged)


def test_the_extra_loss_is_part_of_each_step_once(tmp_path):
    """The step's gradient is that of task loss + AdaLoRA's regulariser (weight 1), with gradient
    accumulation too."""
    batches = token_data(n=8)
    config = method_config("adalora", orth_reg_weight=0.5, tinit=0, tfinal=0)
    model, reference = lorakit.adapt(tiny_llama(), config), lorakit.adapt(tiny_llama(), config)
    reference.load_state_dict(model.state_dict())
    recorder = GradientRecorder()
    trainer = lorakit_trainer(Trainer)(
        model=model,
        args=training_args(
            tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.0
        ),
        train_dataset=batches,
        callbacks=[recorder],
    )
    trainer.train()
    hooks = lorakit.training_hooks(reference, 2)
    order = list(trainer.get_train_dataloader().sampler)  # the examples of the step, in the trainer's order
    ids = torch.tensor(batches["input_ids"])[order]
    loss = sum(reference(input_ids=ids[i : i + 4], labels=ids[i : i + 4]).loss / 2 for i in (0, 4)) + hooks.extra_loss(
        reference
    )
    loss.backward()
    expected = {n: p.grad for n, p in lorakit.adapter_parameters(reference)}
    assert expected.keys() == recorder.steps[0].keys()
    for name, grad in expected.items():
        torch.testing.assert_close(recorder.steps[0][name], grad, atol=1e-6, rtol=1e-5)


def test_delta_lora_moves_the_base_and_lora_drop_probes_first(tmp_path):
    delta = lorakit.adapt(tiny_llama(), method_config("delta-lora"))
    before = {k: v.clone() for k, v in adapter_tensors(delta).items() if ".base_layer." in k}
    run(delta, tmp_path / "delta", max_steps=3)
    after = adapter_tensors(delta)
    assert all(not torch.equal(before[k], after[k]) for k in before)

    drop = lorakit.adapt(tiny_llama(), method_config("lora-drop"))
    trainer = run(drop, tmp_path / "drop", max_steps=2)
    plan = lorakit.inject.adapter_config(drop).plan
    assert plan and plan["groups"]  # decided, with shared pairs
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for _, p in lorakit.adapter_parameters(drop)}  # the optimizer holds the new pairs


def test_a_plain_trainer_refuses_what_only_the_mixin_can_do(tmp_path):
    drop = lorakit.adapt(tiny_llama(), method_config("lora-drop"))
    with pytest.raises(LorakitError, match="lorakit_trainer"):
        run(drop, tmp_path / "drop", trainer_class=Trainer, callbacks=[LorakitCallback()], max_steps=2)
    plus = lorakit.adapt(tiny_llama(), method_config("lora"))
    with pytest.raises(LorakitError, match="LoRA\\+"):
        run(plus, tmp_path / "plus", trainer_class=Trainer, callbacks=[LorakitCallback(loraplus_ratio=16)], max_steps=2)


# --- 4. LoRA+ through the trainer's optimizer -------------------------------------------------------


@pytest.mark.parametrize("method", sorted(lorakit.methods.METHODS))
def test_loraplus_through_the_trainers_optimizer(tmp_path, method):
    model = lorakit.adapt(tiny_llama(), method_config(method))
    trainer = run(
        model,
        tmp_path,
        callbacks=[LorakitCallback(loraplus_ratio=16)],
        max_steps=4,
        weight_decay=0.1,
        lr_scheduler_type="constant",
    )
    groups = trainer.optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for _, p in lorakit.adapter_parameters(model)}
    lrs = {g["name"]: g["lr"] for g in groups}
    assert any(name.startswith("B") for name in lrs)
    for name, lr in lrs.items():
        assert lr == pytest.approx(1e-2 * (16 if name.startswith("B") else 1))
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW  # the trainer's own optimizer choice


def test_loraplus_with_a_plain_trainer_and_its_own_groups(tmp_path):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    optimizer = torch.optim.AdamW(lorakit.param_groups(model, 1e-2, 16))
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=token_data(),
        callbacks=[LorakitCallback(loraplus_ratio=16)],
        optimizers=(optimizer, None),
    )
    trainer.train()


# --- 5. gradient checkpointing ------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_adapters(tmp_path, reentrant):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    recorder = GradientRecorder()
    run(
        model,
        tmp_path,
        callbacks=[recorder],
        max_steps=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    for name, grad in recorder.steps[-1].items():
        assert grad is not None and grad.abs().sum() > 0, name  # lora_A too: B moved off zero in step 1


def frozen_input_checkpointing():
    """Reentrant checkpointing with nothing before the blocks requiring a gradient (transformers
    before 5, or a model whose main input is not `input_ids`); one adapter outside the blocks (the
    output head's), so the loss still has a gradient and the failure is silent."""
    model = lorakit.adapt(tiny_llama(), method_config("lora", targets=["q_proj", "v_proj", "lm_head"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    return model


def test_reentrant_checkpointing_over_frozen_inputs_is_handled(tmp_path, monkeypatch):
    # without lorakit the adapters silently get no gradient at all
    plain = frozen_input_checkpointing()
    recorder = GradientRecorder()
    Trainer(
        model=plain,
        args=training_args(tmp_path / "plain", max_steps=1),
        train_dataset=token_data(),
        callbacks=[recorder],
    ).train()
    inside = {n: g for n, g in recorder.steps[0].items() if "layers." in n}
    assert inside and all(grad is None for grad in inside.values())
    assert all(g is not None for n, g in recorder.steps[0].items() if "lm_head" in n)

    fixed = frozen_input_checkpointing()
    recorder = GradientRecorder()
    run(fixed, tmp_path / "fixed", callbacks=[recorder], max_steps=1)
    assert all(grad is not None for grad in recorder.steps[0].values())

    # and were the fix gone, the run stops instead of training nothing
    from lorakit.integrations import callback

    monkeypatch.setattr(callback, "make_inputs_require_grad", lambda model: None)
    unfixed = frozen_input_checkpointing()
    with pytest.raises(LorakitError, match="received no gradient in the first step .* reentrant"):
        run(unfixed, tmp_path / "unfixed", max_steps=1)


# --- 6. Accelerate: two processes train what one does with twice the batch ---------------------------


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this PyTorch build has no torch.distributed gloo backend",
)
@pytest.mark.distributed
def test_accelerate_launch_two_processes_trains_the_one_process_adapter(tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU) with the trainer and the callback: AdaLoRA's
    hooks and LoRA+ included, the adapter and the ranks are those of one process with twice the batch,
    and only the main process writes adapter files."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    import trainer_runs

    pytest.importorskip("accelerate")
    trainer_runs.main(str(tmp_path / "one"), 8)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(lorakit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(Path(trainer_runs.__file__)),
        str(tmp_path / "two"),
        "4",
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (
        load_file(str(tmp_path / "one" / "final.safetensors")),
        load_file(str(tmp_path / "two" / "final.safetensors")),
    )
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "two" / "ranks.txt").read_text() == (tmp_path / "one" / "ranks.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "two").glob("adapter-written-by-rank-*")) == ["adapter-written-by-rank-0"]
    checkpoint = {p.name for p in (tmp_path / "two" / "checkpoint-4").iterdir()}
    assert {
        "adapter_model.safetensors",
        "lorakit_adapter_state.safetensors",
        "rng_state_0.pth",
        "rng_state_1.pth",
    } <= checkpoint
    assert "model.safetensors" not in checkpoint


# --- 7. inference paths -------------------------------------------------------------------------------


def test_generate_pipeline_and_merged_model(tmp_path):
    from tiny_lm import save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "base")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.adapt(model, method_config("lora", alpha=32.0))
    data = token_data()
    data = data.map(
        lambda row: {
            "input_ids": [t % len(tokenizer) for t in row["input_ids"]],
            "labels": [t % len(tokenizer) for t in row["labels"]],
        }
    )
    trainer = lorakit_trainer(Trainer)(
        model=model,
        args=training_args(tmp_path / "run", max_steps=4, learning_rate=5e-2),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    model.eval()
    prompt = tokenizer("Reverse the order of the words: apple river", return_tensors="pt")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    adapted = model.generate(**prompt, **settings)
    with lorakit.disabled(model):
        base = model.generate(**prompt, **settings)
    assert not torch.equal(adapted, base)  # the adapter changes what is generated
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    text = generator("Reverse the order of the words: apple river", **settings)[0]["generated_text"]
    assert text == tokenizer.decode(adapted[0], skip_special_tokens=True)
    lorakit.merge_and_unload(model)
    torch.testing.assert_close(model.generate(**prompt, **settings), adapted)


# --- what a hostile user may do ----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["16", True, 0, -2.0, float("nan"), float("inf")])
def test_bad_loraplus_ratios_are_refused(ratio):
    with pytest.raises(LorakitError, match="loraplus_ratio"):
        LorakitCallback(loraplus_ratio=ratio)


def test_lorakit_trainer_takes_trainer_classes_only():
    assert lorakit_trainer(Trainer) is lorakit_trainer(Trainer)
    assert lorakit_trainer(lorakit_trainer(Trainer)) is lorakit_trainer(Trainer)
    for bad in (42, object, torch.nn.Module):
        with pytest.raises(LorakitError, match="Trainer class"):
            lorakit_trainer(bad)


def checkpoint_of_two_steps(tmp_path, method="lora"):
    model = lorakit.adapt(tiny_llama(), method_config(method))
    run(model, tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    return tmp_path / "a" / "checkpoint-2"


@pytest.mark.parametrize(
    "damage", ["no-exact-state", "no-hook-state", "truncated-adapter", "truncated-exact-state", "pickle-as-hook-state"]
)
def test_an_incomplete_or_damaged_checkpoint_is_refused(tmp_path, damage):
    checkpoint = checkpoint_of_two_steps(tmp_path)
    if damage == "no-exact-state":
        (checkpoint / EXACT_STATE_NAME).unlink()
    elif damage == "no-hook-state":
        (checkpoint / HOOKS_STATE_NAME).unlink()
    elif damage == "truncated-adapter":
        path = checkpoint / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "truncated-exact-state":
        path = checkpoint / EXACT_STATE_NAME
        path.write_bytes(path.read_bytes()[:-10])
    else:  # an object torch.load(weights_only=True) must not unpickle
        import pickle

        (checkpoint / HOOKS_STATE_NAME).write_bytes(pickle.dumps(Path("/")))
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    with pytest.raises(LorakitError, match="incomplete|damaged|cannot resume"):
        run(model, tmp_path / "b", max_steps=4, resume=str(checkpoint))


def test_resuming_onto_another_method_is_refused(tmp_path):
    checkpoint = checkpoint_of_two_steps(tmp_path)
    model = lorakit.adapt(tiny_llama(), method_config("dora"))
    with pytest.raises(LorakitError, match="'lora' there, 'dora' on the model"):
        run(model, tmp_path / "b", max_steps=4, resume=str(checkpoint))


class Poison(TrainerCallback):
    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            next(p for _, p in lorakit.adapter_parameters(model)).fill_(float("nan"))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    with pytest.raises(LorakitError, match="not finite"):
        run(model, tmp_path, callbacks=[Poison()], max_steps=2, save_strategy="steps", save_steps=1)
    assert not list(tmp_path.rglob("adapter_model.safetensors"))


def test_the_extra_loss_gradient_is_scaled_like_the_task_loss_under_fp16():
    """Under a gradient scaler the task loss's gradients are scaled before clipping unscales them all:
    the extra loss's must be too, or fp16 would shrink the regulariser by the scale."""
    model = lorakit.adapt(tiny_llama(), method_config("adalora", tinit=0, tfinal=0))

    class Scaled:  # what Accelerate's optimizer wrapper carries
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)

    grads = {}
    for optimizer in (None, Scaled()):
        callback = LorakitCallback()
        callback.build_hooks(model, 4)
        model.zero_grad(set_to_none=True)
        callback.add_extra_loss_gradient(model, optimizer)
        grads[optimizer is None] = {
            n: p.grad.clone() for n, p in lorakit.adapter_parameters(model) if p.grad is not None
        }
    assert grads[True] and grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        torch.testing.assert_close(grads[False][name], 8.0 * grads[True][name])


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    model = lorakit.adapt(tiny_llama(), method_config("lora"))
    trainer = lorakit_trainer(Trainer)(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=6,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=False,
        ),  # random held-out tokens: the loss rises, the best is early
        train_dataset=token_data(),
        eval_dataset=token_data(n=8, seed=1),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    expected = adapter_tensors(lorakit.load(tiny_llama(), best))
    got = adapter_tensors(model)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    plain = lorakit.adapt(tiny_llama(), method_config("lora"))
    with pytest.raises(LorakitError, match="load_best_model_at_end"):
        Trainer(
            model=plain,
            args=training_args(
                tmp_path / "plain",
                max_steps=2,
                eval_strategy="steps",
                eval_steps=1,
                save_strategy="steps",
                save_steps=1,
                load_best_model_at_end=True,
            ),
            train_dataset=token_data(),
            eval_dataset=token_data(n=8),
            callbacks=[LorakitCallback()],
        ).train()
