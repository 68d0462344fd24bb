"""Seeded fuzzing of GGUF files, both ways: bases whose header values, tensors or bytes are damaged
(loaded as `lorakit train` loads a model), and the files `lorakit export` writes for random adapters
(read back by the gguf package and by lorakit's own reader).

The contract for a base: a model whose every weight has the shape its config gives and whose forward
gives finite logits, or one `LorakitError` line; never a traceback, a crash or a hang. For an
export: a file both readers read, whose pairs hold the adapter's change exactly as llama.cpp applies
it (alpha / r · B A, in the file's row order), or one `LorakitError` line and no file.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from conftest import perturb_trainable
from lorakit import gguf_export, gguf_reader
from lorakit.errors import LorakitError
from test_fuzz import mutate_bytes, one_line, report, run_isolated
from tiny_lm import save_tiny_gguf

gguf = pytest.importorskip("gguf")
BASE_CASES, EXPORT_CASES = 30, 24

NUMBER_KEYS = [
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.dimension_count",
    "llama.vocab_size",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf-base") / "base.gguf")


def rewrite(source: Path, target: Path, rng: random.Random) -> list[str]:
    """`source` written again with a few changes to its header values or tensors."""
    reader = gguf.GGUFReader(source)
    fields = {f.name: f for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    changes: dict[str, object] = {}
    done = []
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(
            [
                "number",
                "number",
                "type",
                "drop-key",
                "architecture",
                "tensor-shape",
                "drop-tensor",
                "extra-tensor",
                "tensor-type",
                "tokens",
            ]
        )
        if what == "number":
            key = rng.choice(NUMBER_KEYS)
            changes[key] = rng.choice(
                [0, 1, 2, 3, 7, 64, 96, 4096, 2**31 - 1, -1, 0.5, float("nan"), float("inf"), 1e30]
            )
        elif what == "type":
            changes[rng.choice(NUMBER_KEYS)] = rng.choice(["eight", True, [1, 2]])
        elif what == "drop-key":
            changes[rng.choice(list(fields))] = None
        elif what == "architecture":
            changes["general.architecture"] = rng.choice(["gpt2", "qwen2", "bert", "", "no such"])
        elif what == "tokens":
            changes["tokenizer.ggml.tokens"] = rng.choice([[], ["a"], ["a", "a"] * 200])
        else:
            changes[f"@{what}"] = rng.randrange(len(reader.tensors))
        done.append(f"{what}:{list(changes)[-1]}={changes[list(changes)[-1]]!r}")
    architecture = str(changes.get("general.architecture", fields["general.architecture"].contents()))
    writer = gguf.GGUFWriter(str(target), architecture or "llama")
    for name, field in fields.items():
        if name == "general.architecture":
            continue
        if name in changes:
            value = changes[name]
            if value is None:
                continue
            if isinstance(value, bool):
                writer.add_bool(name, value)
            elif isinstance(value, str):
                writer.add_string(name, value)
            elif isinstance(value, list):
                writer.add_array(name, value) if value else writer.add_array(name, ["x"])
            elif isinstance(value, float):
                writer.add_float32(name, value)
            else:
                writer.add_int32(name, value) if -(2**31) <= value < 2**31 else writer.add_uint64(name, value)
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for key, value in changes.items():  # keys the file lacked
        if not key.startswith("@") and key not in fields and isinstance(value, int) and not isinstance(value, bool):
            writer.add_int32(key, value)
    for index, tensor in enumerate(reader.tensors):
        array = np.asarray(tensor.data).reshape(tuple(reversed([int(n) for n in tensor.shape])))
        if changes.get("@drop-tensor") == index:
            continue
        if changes.get("@tensor-shape") == index:
            array = (
                array.reshape(-1)[: max(1, array.size // 2)].reshape(-1)
                if array.ndim == 1
                else array[: max(1, array.shape[0] // 2)]
            )
        if changes.get("@tensor-type") == index and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(tensor.name, np.ascontiguousarray(array))
        if changes.get("@extra-tensor") == index:
            writer.add_tensor(f"{tensor.name}.extra", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return done


def load_and_run(path: Path) -> str | None:
    """None when loading `path` keeps the contract, else what broke it."""
    from lorakit.train.loading import load_model, load_tokenizer

    gguf_reader._read_gguf_header_cached.cache_clear()
    try:
        tokenizer = load_tokenizer(str(path), "causal-lm")
        model = load_model(str(path), "causal-lm", 2, tokenizer)
    except LorakitError as err:
        return None if one_line(str(err)) and len(str(err)) < 2000 else f"error not one short line: {str(err)[:300]!r}"
    ids = torch.tensor([tokenizer("the fox")["input_ids"][:4] or [0]])
    logits = model(input_ids=ids).logits
    if logits.shape[-1] != model.config.vocab_size or not torch.isfinite(logits).all():
        return f"loaded, but the forward gives {tuple(logits.shape)} with finite={bool(torch.isfinite(logits).all())}"
    return None


def problem_of(outcome: tuple) -> str | None:
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[0] == "raised":
        return f"{outcome[1]}: {outcome[2][:300]!r} at {outcome[3]}"
    return f"{outcome[0]}: {outcome[1]}"


def test_damaged_gguf_bases_load_right_or_fail_in_one_line(base, tmp_path):
    failures = []
    for n in range(BASE_CASES):
        rng = random.Random(f"gguf-base:{n}")
        path = tmp_path / f"{n}.gguf"
        if rng.random() < 0.7:
            done = rewrite(base, path, rng)
        else:
            raw, how = mutate_bytes(rng, base.read_bytes(), rng.choice(["flip", "truncate", "delete", "insert"]))
            path.write_bytes(raw)
            done = [f"bytes:{how}"]
        problem = problem_of(run_isolated(lambda: load_and_run(path), 90))
        if problem:
            failures.append(f"[gguf-base:{n}] {done}: {problem}")
    report(failures, "GGUF base", BASE_CASES)


EXPORTABLE = {
    "lora": {},
    "lora-fa": {},
    "vera": {"r": 16},
    "adalora": {"init_r": 4, "target_r": 2, "total_step": 10},
    "lora-drop": {},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def export_case(rng: random.Random, base: Path, out: Path) -> tuple[str, str | None]:
    """Export a random adapter onto the tiny base; (what it was, None or what broke the contract)."""
    from lorakit.models import load_causal_lm

    method = rng.choice(list(EXPORTABLE))
    settings = dict(EXPORTABLE[method])
    settings["targets"] = rng.sample(TARGETS, rng.randint(1, len(TARGETS)))
    if method in ("lora", "lora-fa", "lora-drop"):
        settings["r"] = rng.choice([1, 2, 4, 8, 32])
        settings["alpha"] = rng.choice([1, 8, 16.0, 0.5, 1000])
        settings["rslora"] = rng.random() < 0.3
    if method == "lora" and rng.random() < 0.3:
        settings["rank_pattern"] = {rng.choice(TARGETS): rng.choice([1, 3])}
    if rng.random() < 0.15:
        settings["targets"] = settings["targets"] + ["lm_head"]  # tied to the embeddings in the file: refused
    what = f"{method} {settings}"
    model = load_causal_lm(str(base))
    try:
        lorakit.adapt(model, lorakit.methods.METHODS[method](**settings))
    except ValueError:
        return what, None  # a config the method refuses: nothing to export
    perturb_trainable(model, seed=rng.randrange(1000), std=rng.choice([0.0, 0.01, 1.0]))
    layout = gguf_export.gguf_layout(model, base.parent, base.name)
    outtype = rng.choice(["f32", "f16"])
    try:
        gguf_export.export_adapter(model, layout, out, outtype)
    except LorakitError as err:
        if out.exists():
            return what, f"refused ({err}) but wrote {out.name}"
        return what, None if one_line(str(err)) else f"error not one line: {str(err)[:200]!r}"
    reader = gguf.GGUFReader(out)
    gguf_reader._read_gguf_header(out)  # lorakit's own reader takes it too
    fields = {f.name: f.contents() for f in reader.fields.values()}
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))
        for t in reader.tensors
    }
    alpha = fields["adapter.lora.alpha"]
    if not (np.isfinite(alpha) and alpha > 0):
        return what, f"alpha {alpha}"
    for module, layer in lorakit.inject.adapted_layers(model):
        name = layout.tensor_name(module)
        a, b = tensors.get(f"{name}.lora_a"), tensors.get(f"{name}.lora_b")
        if a is None:
            continue  # AdaLoRA may keep no rank in a module: nothing to add there
        order = layout.row_order(name, b.shape[0])
        change = np.empty_like(b)
        change[order] = b  # back to the model's row order
        applied = (alpha / b.shape[1]) * change.astype(np.float64) @ a.astype(np.float64)
        expected = layer.delta_weight().detach().double().numpy()
        tolerance = 1e-5 if outtype == "f32" else 2e-3
        if not np.allclose(applied, expected, atol=tolerance * max(1.0, np.abs(expected).max()), rtol=tolerance):
            return (
                what,
                f"{name}: the file's change differs from the adapter's by {np.abs(applied - expected).max():.3g}",
            )
    return what, None


def test_exported_adapters_hold_the_change(base, tmp_path):
    failures = []
    for n in range(EXPORT_CASES):
        rng = random.Random(f"gguf-export:{n}")
        out = tmp_path / f"{n}.gguf"
        outcome = run_isolated(lambda: export_case(rng, base, out), 90)
        if outcome[0] == "ok":
            what, problem = outcome[1]
        else:
            what, problem = "?", problem_of(outcome)
        if problem:
            failures.append(f"[gguf-export:{n}] {what}: {problem}")
    report(failures, "GGUF export", EXPORT_CASES)
