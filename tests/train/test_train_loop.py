"""The training loop on a tiny random model: a run's outputs, exact resume, crash-safe
checkpoints, NaN stop, Ctrl-C, classification, config handling."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import LorakitError, TrainConfig, TrainingDiverged, TrainingInterrupted, loop, train
from lorakit.train import checkpoint as ckpt
from lorakit.train import config as config_mod
from lorakit.train import data as data_mod
from tiny_lm import save_tiny_bert, save_tiny_llama, write_jsonl

WORDS = "apple river stone cloud tiger green lamp piano honey fox dog movie".split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def pc_data(tmp_path_factory):
    records = [
        {
            "prompt": f"Reverse: {WORDS[i % 12]} {WORDS[(i * 5) % 12]}\nAnswer:",
            "completion": f" {WORDS[(i * 5) % 12]} {WORDS[i % 12]}",
        }
        for i in range(40)
    ]
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "pc.jsonl", records))


def config(tiny_model, pc_data, tmp_path, **overrides) -> TrainConfig:
    base = dict(
        model=tiny_model,
        data=pc_data,
        out_dir=str(tmp_path),
        name="run",
        steps=6,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        checkpoint_every=2,
        progress=False,
        dropout=0.1,
        grad_accum=2,
    )
    return TrainConfig(**{**base, **overrides})


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def quiet(*_):
    pass


def in_training_loop() -> bool:
    """Whether the trainer's Ctrl-C handler is installed (not while it probes batches for hooks)."""
    return isinstance(getattr(signal.getsignal(signal.SIGINT), "__self__", None), loop.StopFlag)


@pytest.fixture(scope="module")
def reference(tiny_model, pc_data, tmp_path_factory):
    """An uninterrupted 6-step run (dropout and gradient accumulation on)."""
    result = train(config(tiny_model, pc_data, tmp_path_factory.mktemp("ref")), echo=quiet)
    return result, adapter_tensors(result.run_dir)


def test_run_writes_everything(reference):
    result, tensors = reference
    run = result.run_dir
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "config.yaml",
        "metrics.jsonl",
        "report.json",
        "report.txt",
    ):
        assert (run / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-000004", "step-000006"]  # keep 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    assert result.metric == "eval_loss" and result.after["eval_loss"] < result.before["eval_loss"]
    table = result.table()
    for label in (
        "method",
        "trainable params",
        "adapter size on disk",
        "peak memory",
        "tokens/s",
        "eval_loss (held-out)",
    ):
        assert label in table
    assert any(not torch.all(t == 0) for k, t in tensors.items() if "lora_B" in k)
    saved = config_mod.from_dict(config_mod.load_yaml(run / "config.yaml"))
    assert saved.steps == 6 and saved.resume is None


def test_resume_after_ctrl_c_is_bit_identical(reference, tiny_model, pc_data, tmp_path, monkeypatch):
    original = data_mod.micro_batch

    def interrupt_during_step_3(examples, index, batch_size, seed):
        if index == 4 and in_training_loop():  # the first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return original(examples, index, batch_size, seed)

    monkeypatch.setattr(data_mod, "micro_batch", interrupt_during_step_3)
    cfg = config(tiny_model, pc_data, tmp_path, checkpoint_every=0)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3; checkpoint saved"):
        train(cfg, echo=quiet)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000003"]
    monkeypatch.setattr(data_mod, "micro_batch", original)
    result = train(config(tiny_model, pc_data, tmp_path, checkpoint_every=0, resume=str(tmp_path / "run")), echo=quiet)
    assert_bit_equal(adapter_tensors(result.run_dir), reference[1])
    assert result.before == reference[0].before


def test_crash_mid_save_keeps_last_checkpoint_and_resume_is_exact(
    reference, tiny_model, pc_data, tmp_path, monkeypatch
):
    real_save = torch.save
    calls = {"n": 0}

    def crash_on_second_checkpoint(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint 1 writes optimizer.pt and hooks.pt; die inside checkpoint 2
            raise OSError("simulated crash: disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_second_checkpoint)
    with pytest.raises(
        LorakitError, match="checkpoint step-000004 was not written: .*simulated crash.*step-000002 is kept"
    ):
        train(config(tiny_model, pc_data, tmp_path), echo=quiet)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000002"]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]  # cleaned up
    # a hard kill would leave the temporary directory behind: it must never be taken for a checkpoint
    leftover = checkpoints / ".tmp-step-000004-abc"
    leftover.mkdir()
    (leftover / "state.json").write_text("{}")
    assert ckpt.find_checkpoint(tmp_path / "run").name == "step-000002"
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    result = train(config(tiny_model, pc_data, tmp_path, resume=str(tmp_path / "run")), echo=quiet)
    assert_bit_equal(adapter_tensors(result.run_dir), reference[1])


@pytest.mark.parametrize("chunked_loss", [True, False])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model, pc_data, tmp_path, monkeypatch, chunked_loss):
    from lorakit import losses

    real_ce, real_chunked = torch.nn.functional.cross_entropy, losses.linear_cross_entropy
    calls = {"n": 0}

    def nan_from_step_3(real):
        def loss(*args, **kwargs):
            out = real(*args, **kwargs)
            if torch.is_grad_enabled():  # training only, not the evaluation before training
                calls["n"] += 1
                if calls["n"] > 2 * 2:  # 2 micro-batches per step: NaN from step 3 on
                    return out * float("nan")
            return out

        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_from_step_3(real_ce))
    monkeypatch.setattr(losses, "linear_cross_entropy", nan_from_step_3(real_chunked))
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan at step 3; stopped\. The last good checkpoint is .*step-000002"
    ):
        train(config(tiny_model, pc_data, tmp_path, chunked_loss=chunked_loss), echo=quiet)
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-000002"]
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_ce)
    monkeypatch.setattr(losses, "linear_cross_entropy", real_chunked)
    resumed = train(
        config(tiny_model, pc_data, tmp_path, resume=str(tmp_path / "run"), chunked_loss=chunked_loss), echo=quiet
    )
    assert resumed.steps == 6 and (resumed.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_classification_trains_head_and_adapter(tmp_path):
    model = save_tiny_bert(tmp_path / "bert")
    rows = "".join(
        f"{w} movie {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}\n" for i, w in enumerate(WORDS * 3)
    )
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    cfg = TrainConfig(
        model=str(model),
        task="classify",
        data=str(tmp_path / "train.tsv"),
        out_dir=str(tmp_path),
        name="cls",
        steps=3,
        batch_size=4,
        progress=False,
    )
    result = train(cfg, echo=quiet)
    assert result.metric == "accuracy" and 0.0 <= result.after["accuracy"] <= 1.0
    keys = adapter_tensors(result.run_dir)
    assert any(k.endswith("classifier.weight") for k in keys) and any("lora_A" in k for k in keys)
    (tmp_path / "eval.tsv").write_text("sentence\tlabel\nfox\tneutral\n")
    with pytest.raises(
        LorakitError, match=r"eval\.tsv:2: label 'neutral' is not among the training labels \['neg', 'pos'\]"
    ):
        train(TrainConfig(**{**cfg.__dict__, "eval_data": str(tmp_path / "eval.tsv"), "name": "cls2"}), echo=quiet)


def test_method_config_is_built_from_registry_fields(tiny_model):
    model = torch.nn.Module()
    cfg = loop.method_config(
        TrainConfig(method="lora", r=4, alpha=8.0, targets="q_proj,v_proj", method_args={"rslora": True}), model
    )
    assert (cfg.r, cfg.alpha, cfg.targets, cfg.rslora) == (4, 8.0, ["q_proj", "v_proj"], True)
    assert loop.method_config(TrainConfig(targets="q_proj"), model).targets == ["q_proj"]
    assert loop.method_config(TrainConfig(targets=r".*\.(q|v)_proj"), model).targets == r".*\.(q|v)_proj"
    assert loop.method_config(TrainConfig(), model).targets == "all-linear"
    with pytest.raises(LorakitError, match="has no setting 'rank_patern'"):
        loop.method_config(TrainConfig(method_args={"rank_patern": {"q_proj": 3}}), model)
    with pytest.raises(LorakitError, match="rank_pattern must be a mapping"):
        loop.method_config(TrainConfig(method_args={"rank_pattern": 3}), model)
    assert loop.method_config(TrainConfig(method_args={"rank_pattern": {"q_proj": 3}}), model).rank_pattern == {
        "q_proj": 3
    }
    with pytest.raises(LorakitError, match="unknown method 'nope'"):
        loop.method_config(TrainConfig(method="nope"), model)


def test_lr_schedule_shapes():
    assert loop.lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert loop.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert loop.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert loop.lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert loop.lr_factor(99, 100, 10, "constant") == 1.0


def test_existing_run_is_not_overwritten(reference, tiny_model, pc_data):
    result, _ = reference
    cfg = config(tiny_model, pc_data, result.run_dir.parent)
    with pytest.raises(LorakitError, match="already holds files: resume the run with --resume"):
        train(cfg, echo=quiet)


@pytest.mark.parametrize("method", sorted(__import__("lorakit.methods").methods.METHODS))
def test_every_registered_method_trains_and_resumes_exactly(method, tiny_model, pc_data, tmp_path, monkeypatch):
    """Methods come from the registry: each trains through the same loop, hooks included
    (Delta-LoRA's base update), and an interrupted run resumes to bit-identical weights."""
    # VeRA's default rank is large; the tiny model keeps it small.
    overrides = dict(steps=3, grad_accum=1, method=method, r=4, dropout=None, checkpoint_every=0, loraplus_ratio=4.0)
    if method == "delta-lora":
        overrides["method_args"] = {"start_step": 1}
    if method == "adalora":  # interrupted in the middle of the budget schedule
        overrides.update(r=None, method_args={"init_r": 4, "target_r": 2, "tfinal": 1})
    ref = train(config(tiny_model, pc_data, tmp_path / "ref", **overrides), echo=quiet)
    original = data_mod.micro_batch

    def interrupt_in_step_2(examples, index, batch_size, seed):
        if index == 1 and in_training_loop():
            os.kill(os.getpid(), signal.SIGINT)
        return original(examples, index, batch_size, seed)

    monkeypatch.setattr(data_mod, "micro_batch", interrupt_in_step_2)
    with pytest.raises(TrainingInterrupted):
        train(config(tiny_model, pc_data, tmp_path / "cut", **overrides), echo=quiet)
    monkeypatch.setattr(data_mod, "micro_batch", original)
    resumed = train(
        config(tiny_model, pc_data, tmp_path / "cut", resume=str(tmp_path / "cut" / "run"), **overrides), echo=quiet
    )
    assert_bit_equal(adapter_tensors(resumed.run_dir), adapter_tensors(ref.run_dir))


# --- nothing lost (issue 19) ---------------------------------------------------------------------


def test_a_directory_with_files_is_not_reused_without_overwrite(tiny_model, pc_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(LorakitError, match="already holds files: resume the run with --resume .* --overwrite"):
        train(config(tiny_model, pc_data, tmp_path, steps=2), echo=quiet)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched
    result = train(config(tiny_model, pc_data, tmp_path, steps=2, overwrite=True), echo=quiet)
    assert (run / "notes.txt").read_text() == "mine" and (result.run_dir / "adapter").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="is a file, not a run directory"):
        train(config(tiny_model, pc_data, tmp_path, steps=2, name="file"), echo=quiet)


def test_non_finite_weights_stop_the_run_and_only_finite_checkpoints_exist(tiny_model, pc_data, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the loss stays finite at this step; the weights do not
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(
        TrainingDiverged, match=r"weights became non-finite at step 3.*last good checkpoint is .*step-000002"
    ):
        train(config(tiny_model, pc_data, tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=1), echo=quiet)
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-000002"] and ckpt.is_finite(found[0])


def test_resume_of_a_run_cut_after_its_last_checkpoint_finishes_it(tiny_model, pc_data, tmp_path, capsys):
    import shutil

    from lorakit import cli

    result = train(config(tiny_model, pc_data, tmp_path, steps=2), echo=quiet)
    expected = adapter_tensors(result.run_dir)
    shutil.rmtree(result.run_dir / "adapter")  # killed after the last checkpoint, before adapter/ was written
    (result.run_dir / "report.json").unlink()
    assert cli.main(["eval", "--adapter", str(result.run_dir)]) == 2
    assert "has no adapter/ yet (the run did not finish): `lorakit train --resume" in capsys.readouterr().err
    finished = train(config(tiny_model, pc_data, tmp_path, steps=2, resume=str(result.run_dir)), echo=quiet)
    assert_bit_equal(adapter_tensors(finished.run_dir), expected)
    assert (finished.run_dir / "report.json").is_file()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"grad_clip": -1.0}, "grad_clip must be positive"),
        ({"grad_clip": 0}, "grad_clip must be positive"),
        ({"steps": True}, "steps: expected int, got True"),
        ({"lr": "inf"}, "lr: must be a finite number"),
        ({"lr": float("nan")}, "lr: must be a finite number"),
        ({"r": 10**40}, "r: .* is out of range"),
        ({"loraplus_ratio": -2}, "loraplus_ratio must be positive"),
    ],
)
def test_config_values_that_used_to_pass_silently(fields, message):
    with pytest.raises(LorakitError, match=message):
        config_mod.validate(config_mod.from_dict(fields))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rslora": "maybe"}, "LoRA.rslora must be true or false, got 'maybe'"),
        ({"rslora": "no"}, "LoRA.rslora must be true or false"),
        ({"alpha": float("nan")}, "LoRA.alpha must be finite"),
        ({"r": True}, "LoRA.r must be an integer"),
    ],
)
def test_method_fields_are_typed(kwargs, message):
    import lorakit

    with pytest.raises(ValueError, match=message):
        lorakit.LoRA(**kwargs)
    with pytest.raises(LorakitError, match=message):
        loop.method_config(TrainConfig(method_args=kwargs), torch.nn.Module())


def test_crash_leftovers_are_cleaned_and_a_failed_start_leaves_no_run_dir(tiny_model, pc_data, tmp_path, monkeypatch):
    result = train(config(tiny_model, pc_data, tmp_path, steps=4, checkpoint_every=2), echo=quiet)
    checkpoints = result.run_dir / "checkpoints"
    (checkpoints / ".tmp-step-000006-x").mkdir()
    (checkpoints / "step-000001").mkdir()  # half deleted: no state.json
    (checkpoints / "step-000001" / "rng.safetensors").write_bytes(b"")
    train(config(tiny_model, pc_data, tmp_path, steps=6, checkpoint_every=2, resume=str(result.run_dir)), echo=quiet)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004", "step-000006"]
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: (_ for _ in ()).throw(LorakitError("no such model")))
    with pytest.raises(LorakitError, match="no such model"):
        train(config(tiny_model, pc_data, tmp_path, name="never"), echo=quiet)
    assert not (tmp_path / "never").exists()


def test_paths_names_torn_logs_and_a_full_disk(tiny_model, pc_data, tmp_path, monkeypatch):
    import errno

    for bad in ("a/b", "..", "x\ny", ""):
        with pytest.raises(LorakitError, match="must be a plain directory name"):
            train(config(tiny_model, pc_data, tmp_path, name=bad), echo=quiet)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="--out-dir .* is a file"):
        train(config(tiny_model, pc_data, tmp_path / "file"), echo=quiet)
    result = train(config(tiny_model, pc_data, tmp_path, steps=4, checkpoint_every=2), echo=quiet)
    log = result.run_dir / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + '\n{"step": 3, "lo')  # a crash tore the last line
    checkpoints = result.run_dir / "checkpoints"
    for step in ("step-000004",):
        import shutil

        shutil.rmtree(checkpoints / step)
    train(config(tiny_model, pc_data, tmp_path, steps=4, checkpoint_every=2, resume=str(result.run_dir)), echo=quiet)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    real_save = torch.save

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(LorakitError, match="the disk is full: checkpoint step-000002 was not written"):
        train(config(tiny_model, pc_data, tmp_path, steps=4, checkpoint_every=2, name="full"), echo=quiet)
    monkeypatch.setattr(ckpt.torch, "save", real_save)


def test_a_classifier_head_is_drawn_from_the_seed(tmp_path):
    # the head is random when the model loads: two runs with one seed (compare's methods) start
    # from the same head, and another seed from another
    model = save_tiny_bert(tmp_path / "bert")
    rows = "".join(
        f"{w} movie {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}\n" for i, w in enumerate(WORDS * 3)
    )
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)

    def before(name: str, seed: int, method: str) -> dict:
        cfg = TrainConfig(
            model=str(model),
            task="classify",
            data=str(tmp_path / "train.tsv"),
            out_dir=str(tmp_path),
            name=name,
            steps=1,
            batch_size=4,
            progress=False,
            seed=seed,
            method=method,
        )
        return train(cfg, echo=quiet).before

    first = before("a", 0, "lora")
    assert before("b", 0, "dora") == first  # DoRA starts as the base, as LoRA does: the same head, the same numbers
    assert before("c", 1, "lora")["eval_loss"] != first["eval_loss"]


def test_measure_limit_times_the_base_beside_the_steps_and_changes_nothing(reference, tiny_model, pc_data, tmp_path):
    """--measure-limit: the limit (no adapter, backward to the activations only) timed after the
    run's steps on their own micro-batches; the paired ratios' median in the report; the run's
    adapter bit-identical to one without the probes."""
    result = train(config(tiny_model, pc_data, tmp_path, measure_limit=True), echo=quiet)
    assert_bit_equal(adapter_tensors(result.run_dir), reference[1])
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["step_vs_limit"] == result.step_vs_limit > 0 and report["limit_step_seconds"] > 0
    assert "step / limit" in result.table() and reference[0].step_vs_limit is None
    # never the first step (warm-up); the probes travel in the checkpoint's state, so a resume keeps them
    state = json.loads((ckpt.list_checkpoints(result.run_dir / "checkpoints")[-1] / "state.json").read_text())
    assert [probe[0] for probe in state["limit_probes"]] == [2, 3, 4, 5, 6]


def test_measure_limit_keeps_the_random_stream_and_the_trainable_head(tmp_path):
    """A base with dropout (BERT) and a trainable classifier head: the probes draw no random number
    the run would see and form no parameter gradient, so the adapter and head are bit-identical."""
    model = save_tiny_bert(tmp_path / "bert")
    rows = "".join(
        f"{w} movie {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}\n" for i, w in enumerate(WORDS * 3)
    )
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    runs = {}
    for measure in (False, True):
        cfg = TrainConfig(
            model=str(model),
            task="classify",
            data=str(tmp_path / "train.tsv"),
            out_dir=str(tmp_path),
            name=f"cls-{measure}",
            steps=4,
            batch_size=4,
            progress=False,
            measure_limit=measure,
        )
        runs[measure] = train(cfg, echo=quiet)
    assert_bit_equal(adapter_tensors(runs[True].run_dir), adapter_tensors(runs[False].run_dir))
    assert runs[True].step_vs_limit > 0 and runs[False].step_vs_limit is None
