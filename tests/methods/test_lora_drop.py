"""LoRA-drop: importance on a model whose important modules are known, the plan (kept modules, shared
pairs) as the adapter's layout, a shared pair saved once and merged into every module sharing it,
both stages inside `lorakit train` and a resume that does not re-run stage 1."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.lora_drop import choose_kept, module_importance


class Branches(nn.Module):
    """Four parallel linear branches of the same kind; branch i sees the input scaled by SCALES[i], so
    after the same brief training the update of a loud branch moves its output far more."""

    SCALES = (3.0, 2.0, 0.01, 0.02)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(8, 8)}) for _ in self.SCALES)

    def forward(self, x):
        return sum(block["proj"](x * scale) for block, scale in zip(self.blocks, self.SCALES))


def regression_batches(count=6):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 8, generator=g)
    return [(lambda x: {"x": x, "y": x @ target})(torch.randn(16, 8, generator=g)) for _ in range(count)]


def mse(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


class Wrapper(nn.Module):
    """`model(**batch)` for the importance pass: takes the dict and ignores the target."""

    def __init__(self):
        super().__init__()
        self.inner = Branches()

    def forward(self, x, y=None):
        return self.inner(x)


def test_the_loud_branches_keep_their_own_pairs_and_the_quiet_ones_share_one(tmp_path):
    model = Wrapper()
    lorakit.adapt(model, lorakit.LoRADrop(r=2, targets=["proj"], threshold=0.9, probe_steps=20))
    batches = regression_batches()
    lorakit.training_hooks(model).before_training(model, lorakit.hooks.Probe(batches, mse, lr=0.05))
    plan = lorakit.inject.adapter_config(model).plan
    assert plan["kept"] == ["inner.blocks.0.proj", "inner.blocks.1.proj"]
    assert set(plan["groups"]) == {"inner.blocks.2.proj", "inner.blocks.3.proj"}
    assert len(set(plan["groups"].values())) == 1 and abs(sum(plan["scores"].values()) - 1) < 1e-6
    layers = dict(lorakit.inject.adapted_layers(model))
    shared = layers["inner.blocks.2.proj"].adapter
    assert shared is layers["inner.blocks.3.proj"].adapter and shared is not layers["inner.blocks.0.proj"].adapter
    # parameters: two own pairs + one shared pair, each r (in + out) = 2 * 16
    assert sum(p.numel() for _, p in lorakit.adapter_parameters(model)) == 3 * 2 * 16
    assert all(
        torch.equal(layer.adapter.lora_B, torch.zeros(8, 2)) for layer in layers.values()
    )  # stage 2 starts afresh
    table = lorakit.summary(model, per_module=True)
    assert "inner.blocks.3.proj" in table and "(shares inner.blocks.2.proj's pair)" in table

    with torch.no_grad():
        for _, p in lorakit.adapter_parameters(model):
            p.normal_(std=0.2)
    x = torch.randn(5, 8)
    expected = model(x)
    lorakit.save(model, tmp_path)
    tensors = lorakit.io.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 3 * 2  # the shared pair once
    meta = json.loads((tmp_path / "lorakit.json").read_text())
    assert meta["config"]["plan"]["kept"] == plan["kept"] and not (tmp_path / "adapter_config.json").exists()
    loaded = lorakit.load(Wrapper(), tmp_path)
    torch.testing.assert_close(loaded(x), expected)
    loaded_layers = dict(lorakit.inject.adapted_layers(loaded))
    assert loaded_layers["inner.blocks.2.proj"].adapter is loaded_layers["inner.blocks.3.proj"].adapter
    lorakit.training_hooks(loaded).before_training(loaded, lorakit.hooks.Probe(batches, mse, lr=0.05))  # planned: no-op
    torch.testing.assert_close(loaded(x), expected)
    merged = lorakit.merge_and_unload(loaded)  # the shared product goes into both quiet branches
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_importance_is_the_output_change_of_each_update():
    model = Wrapper()
    lorakit.adapt(model, lorakit.LoRA(r=2, targets=["proj"]))
    with torch.no_grad():
        for _, p in lorakit.adapter_parameters(model):
            p.normal_(std=0.1)
    batches = regression_batches(2)
    importance = module_importance(model, "default", batches)
    g = {}
    for name, layer in lorakit.inject.adapted_layers(model):
        index = int(name.split(".")[2])
        delta = layer.delta_weight()
        g[name] = sum(float(((b["x"] * Branches.SCALES[index]) @ delta.T).pow(2).sum()) for b in batches)
    total = sum(g.values())
    for name in g:
        assert importance[name] == pytest.approx(g[name] / total, rel=1e-4)


def test_choose_kept_takes_the_fewest_reaching_the_threshold():
    scores = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    assert choose_kept(scores, 0.9) == ["a", "b", "c"]
    assert choose_kept(scores, 0.5) == ["a"]
    assert choose_kept(scores, 1.0) == ["a", "b", "c", "d"]
    assert choose_kept({"x": 0.5, "y": 0.5}, 0.4) == ["x"]  # ties: by name, deterministic


def test_bad_settings_are_clear_errors():
    for kwargs, message in (
        ({"threshold": 0.0}, "threshold must be in"),
        ({"sample_fraction": 1.5}, "sample_fraction"),
        ({"probe_steps": 0}, "probe_steps"),
        ({"plan": {"kept": []}}, "plan must be"),
        ({"init": "loftq"}, "only init='default'"),
    ):
        with pytest.raises(ValueError, match=message):
            lorakit.LoRADrop(**kwargs)


def test_lorakit_train_runs_both_stages_and_resume_does_not_repeat_stage_one(tmp_path, monkeypatch):
    from lorakit.methods import lora_drop
    from lorakit.train import TrainConfig, train
    from test_hooks import interrupted_then_resumed
    from test_train_loop import adapter_tensors, assert_bit_equal, quiet
    from tiny_lm import save_tiny_llama, write_jsonl

    model_dir = str(save_tiny_llama(tmp_path / "model"))
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": f"say {w}", "completion": f" {w} {w}"}
            for w in "red green blue cyan pink gold gray navy".split() * 5
        ],
    )
    calls = []
    real = lora_drop.apply_plan
    monkeypatch.setattr(lora_drop, "apply_plan", lambda *a, **k: calls.append(1) or real(*a, **k))

    def cfg_of(out, **extra):
        return TrainConfig(
            model=model_dir,
            data=str(data),
            out_dir=str(out),
            name="run",
            steps=4,
            batch_size=4,
            lr=2e-2,
            progress=False,
            checkpoint_every=0,
            method="lora-drop",
            r=4,
            method_args={"sample_fraction": 0.25, "threshold": 0.5},
            **extra,
        )

    reference = train(cfg_of(tmp_path / "ref"), echo=quiet)
    plan = json.loads((reference.run_dir / "adapter" / "lorakit.json").read_text())["config"]["plan"]
    assert plan["kept"] and plan["groups"] and len(calls) == 1
    report = json.loads((reference.run_dir / "report.json").read_text())
    assert report["adapter_layout"]["plan"]["kept"] == plan["kept"]
    assert reference.trainable_params < 2 * 7 * 4 * (32 + 64)  # fewer than plain LoRA on all 14 modules
    calls.clear()
    resumed = interrupted_then_resumed(cfg_of, tmp_path, monkeypatch, at_index=2)
    assert len(calls) == 1  # the interrupted run decided; the resume replayed
    assert_bit_equal(adapter_tensors(resumed.run_dir), adapter_tensors(reference.run_dir))


def test_a_shared_pair_has_one_rank_and_scale_for_every_module_sharing_it():
    """rank_pattern / alpha_pattern giving modules of one kind different settings: stage 1 puts them
    in different groups (each shared pair has its members' rank and scale), and a plan that groups
    them anyway is refused instead of giving every member the first one's rank."""
    pattern = {"inner.blocks.2.proj": 4}
    model = Wrapper()
    lorakit.adapt(model, lorakit.LoRADrop(r=2, targets=["proj"], threshold=0.9, probe_steps=20, rank_pattern=pattern))
    lorakit.training_hooks(model).before_training(model, lorakit.hooks.Probe(regression_batches(), mse, lr=0.05))
    plan = lorakit.inject.adapter_config(model).plan
    assert set(plan["groups"]) == {"inner.blocks.2.proj", "inner.blocks.3.proj"}
    assert plan["groups"]["inner.blocks.2.proj"] != plan["groups"]["inner.blocks.3.proj"]
    layers = dict(lorakit.inject.adapted_layers(model))
    assert layers["inner.blocks.2.proj"].adapter.r == 4 and layers["inner.blocks.3.proj"].adapter.r == 2

    one_group = {**plan, "groups": {"inner.blocks.2.proj": "proj(8x8)", "inner.blocks.3.proj": "proj(8x8)"}}
    for settings in ({"rank_pattern": pattern}, {"alpha_pattern": {"inner.blocks.3.proj": 3.0}}):
        with pytest.raises(
            ValueError,
            match=r"LoRA-drop group .proj\(8x8\).: inner\.blocks\.3\.proj has rank and scale .* share one pair need the same",
        ):
            lorakit.adapt(Wrapper(), lorakit.LoRADrop(r=2, targets=["proj"], plan=one_group, **settings))
