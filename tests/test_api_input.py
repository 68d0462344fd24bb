"""The Python API on a user's mistakes: a clear lorakit error (or warning) instead of a raw OS or
autograd error."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.errors import LorakitError


def adapted():
    return lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_save_onto_a_file_is_a_lorakit_error(tmp_path, where):
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" if where == "file" else tmp_path / "notes.txt" / "adapter"
    with pytest.raises(LorakitError, match=r"cannot save the adapter to .*notes\.txt") as caught:
        lorakit.save(adapted(), target)
    assert "\n" not in str(caught.value)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_training_a_merged_adapter_says_it_is_merged(input_ids):
    model = adapted()
    lorakit.merge(model)
    model.train()
    with pytest.warns(UserWarning, match=r"\['default'\] are merged into the base weights.*lorakit\.unmerge"):
        loss = model(input_ids, labels=input_ids).loss
    with pytest.raises(RuntimeError, match="does not require grad"):  # autograd's own words follow the warning
        loss.backward()
    with pytest.raises(LorakitError, match=r"merged into the base weights"):
        lorakit.training_hooks(model)
    lorakit.unmerge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids, labels=input_ids).loss.backward()  # unmerged: trains, no warning
        lorakit.merge(model)
        model.eval()
        with torch.no_grad():
            model(input_ids)  # merged for inference: no warning


def test_the_trainer_callback_refuses_a_merged_adapter(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from lorakit.integrations import LorakitCallback
    from trainer_runs import token_data, training_args

    model = adapted()
    lorakit.merge(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=token_data(),
        callbacks=[LorakitCallback()],
    )
    with pytest.raises(LorakitError, match=r"merged into the base weights"):
        trainer.train()
