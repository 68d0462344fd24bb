"""Where the commands write: nothing the user had is replaced without --overwrite, a command's own
inputs never are, and a path that cannot be written (read-only, a full disk, a broken link, a
directory where a file goes, a file where a directory goes) is one line, `error: ...`, exit 2, with
what was there kept as it was."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit.compare
from lorakit import cli
from lorakit.cli import build_parser, resolve_train_config
from small_disk import run_on_small_disk, snapshot
from tiny_lm import save_tiny_llama, write_jsonl

CLI_BATCH = str(Path(__file__).parent.parent / "cli_batch.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, its data and a trained run (`runs/a`, with checkpoints)."""
    root = tmp_path_factory.mktemp("outputs")
    model = save_tiny_llama(root / "model")
    data = write_jsonl(root / "pc.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i} {i + 1}"} for i in range(24)])
    code = cli.main(
        [
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "1",
            "--out-dir",
            str(root / "runs"),
            "--name",
            "a",
            "--no-progress",
        ]
    )
    assert code == 0
    return root, model, data, root / "runs" / "a"


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_export_never_writes_over_its_own_inputs(world, capsys):
    root, model, _, run = world
    for target in (run / "adapter" / "adapter_model.safetensors", model / "model.safetensors"):
        before = target.read_bytes()
        assert cli.main(["export", "--adapter", str(run), "--out", str(target), "--overwrite"]) == 2
        assert "an input of this command" in error_line(capsys)
        assert target.read_bytes() == before
    link = root / "link.gguf"  # through a symbolic link, too
    link.symlink_to(model / "model.safetensors")
    assert cli.main(["export", "--adapter", str(run), "--out", str(link), "--overwrite"]) == 2
    assert "is a file of the base model's own directory" in error_line(capsys) and link.is_symlink()


def test_compare_leaves_a_directory_of_the_users_files_alone(world, tmp_path, capsys):
    _, model, data, _ = world
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "compare.csv").write_text("my own table\n")
    (mine / "notes.txt").write_text("keep me\n")
    before = snapshot(mine)
    flags = [
        "compare",
        "--methods",
        "lora,dora",
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "mine",
        "--no-progress",
    ]
    assert cli.main(flags) == 2
    assert "--name" in (line := error_line(capsys)) and "already holds files" in line and "--overwrite" in line
    assert snapshot(mine) == before
    shutil.copy(data, mine / "data.jsonl")  # even with --overwrite: never into a directory holding its data
    assert cli.main([*flags[:6], str(mine / "data.jsonl"), *flags[7:], "--overwrite"]) == 2
    assert "holds the data" in error_line(capsys)
    assert (mine / "compare.csv").read_text() == "my own table\n"


def test_inspect_replaces_a_file_only_with_overwrite(world, tmp_path, capsys):
    _, _, data, run = world
    kept = tmp_path / "kept.jsonl"
    shutil.copy(data, kept)
    for flag in ("--json", "--html"):
        assert (
            cli.main(
                [
                    "inspect",
                    str(run),
                    flag,
                    str(kept),
                    "--no-html" if flag == "--json" else "--json=" + str(tmp_path / "x.json"),
                ]
            )
            == 2
        )
        assert f"{flag} {kept} exists" in error_line(capsys) and kept.read_bytes() == data.read_bytes()
        assert not (tmp_path / "x.json").exists()  # refused before anything was written
    assert cli.main(["inspect", str(run), "--json", str(kept), "--no-html", "--overwrite"]) == 0
    assert json.loads(kept.read_text())  # replaced, on purpose
    # the run's own report is this command's: written again; a file of the user's in its place is not
    assert cli.main(["inspect", str(run), "--no-html"]) == 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert cli.main(["inspect", str(run)]) == 0 and cli.main(["inspect", str(run)]) == 0
        capsys.readouterr()
        (run / "inspect.html").write_text("<p>my notes</p>")
        assert cli.main(["inspect", str(run)]) == 2
        assert "inspect.html exists" in error_line(capsys) and (run / "inspect.html").read_text() == "<p>my notes</p>"
        (run / "inspect.html").unlink()


def test_merge_replaces_only_a_model_directory_and_only_with_overwrite(world, tmp_path, capsys):
    _, _, _, run = world
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(run), "--out", str(merged)]) == 0
    capsys.readouterr()
    (merged / "mine.txt").write_text("mine")
    before = snapshot(merged)
    assert cli.main(["merge", "--adapter", str(run), "--out", str(merged)]) == 2
    assert "already holds files" in error_line(capsys) and snapshot(merged) == before
    assert cli.main(["merge", "--adapter", str(run), "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file() and not (merged / "mine.txt").exists()  # replaced as a whole
    capsys.readouterr()
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    assert cli.main(["merge", "--adapter", str(run), "--out", str(users), "--overwrite"]) == 2
    assert "holds files that are not a model directory" in error_line(capsys)
    assert (users / "thesis.tex").read_text() == "years of work"
    assert cli.main(["merge", "--adapter", str(run), "--out", str(run / "adapter" / "merged"), "--overwrite"]) == 2
    assert "lies inside the adapter's own directory" in error_line(capsys)
    assert cli.main(["merge", "--adapter", str(run), "--out", str(tmp_path / "empty")]) == 0  # an empty one is fine
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def bad_paths(tmp_path: Path) -> dict[str, Path]:
    """A broken link, a directory, and a path under a file."""
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere" / "x")
    return {"broken": tmp_path / "broken", "dir": tmp_path / "a-dir", "under-file": tmp_path / "a-file" / "out"}


@pytest.mark.parametrize("kind", ["broken", "dir", "under-file"])
def test_an_output_path_that_cannot_be_written_is_one_line(kind, world, tmp_path, capsys):
    _, model, data, run = world
    path = bad_paths(tmp_path)[kind]
    commands = [
        ["export", "--adapter", str(run), "--out", str(path)],
        ["inspect", str(run), "--json", str(path), "--no-html"],
        ["inspect", str(run), "--html", str(path)],
        ["merge", "--adapter", str(run), "--out", str(path)],
        [
            "compare",
            "--methods",
            "lora",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out-dir",
            str(path),
            "--name",
            "c",
        ],
        ["train", "--model", str(model), "--data", str(data), "--out-dir", str(path), "--name", "t", "--steps", "1"],
    ]
    for argv in commands:
        if kind == "dir" and argv[0] in ("merge", "compare", "train"):
            continue  # a directory is what these write
        before = snapshot(tmp_path)
        assert cli.main(argv) == 2, argv
        line = error_line(capsys)
        assert {"broken": "broken symbolic link", "dir": "is a directory", "under-file": "is a file"}[kind] in line, (
            line
        )
        assert snapshot(tmp_path) == before


def test_a_missing_parent_directory_is_made(world, tmp_path, capsys):
    _, _, _, run = world
    assert cli.main(["inspect", str(run), "--json", str(tmp_path / "new" / "deeper" / "all.json"), "--no-html"]) == 0
    assert json.loads((tmp_path / "new" / "deeper" / "all.json").read_text())
    assert cli.main(["export", "--adapter", str(run), "--out", str(tmp_path / "n2" / "a.gguf")]) == 0
    assert (tmp_path / "n2" / "a.gguf").is_file()


def batch(tmp_path: Path, commands: list[list[str]], **disk) -> list[dict]:
    """`commands` in one process (tests/cli_batch.py) on a small disk at tmp_path/disk."""
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    done = run_on_small_disk(
        tmp_path / "disk",
        [sys.executable, CLI_BATCH, str(tmp_path / "commands.json"), str(tmp_path / "results.json")],
        after=tmp_path / "after",
        **disk,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text())


def assert_one_line_each(results: list[dict], words: str) -> None:
    for result in results:
        lines = result["stderr"].strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert result["code"] == 2 and errors and errors[-1] == lines[-1], result
        assert words in errors[-1] and "Traceback" not in result["stderr"], result


def test_a_read_only_output_directory_is_one_line(world, tmp_path):
    _, model, data, run = world
    disk = tmp_path / "disk"
    results = batch(
        tmp_path,
        [
            ["export", "--adapter", str(run), "--out", str(disk / "a.gguf")],
            ["inspect", str(run), "--json", str(disk / "all.json"), "--no-html"],
            ["inspect", str(run), "--html", str(disk / "page.html")],
            ["merge", "--adapter", str(run), "--out", str(disk / "merged")],
            [
                "compare",
                "--methods",
                "lora",
                "--model",
                str(model),
                "--data",
                str(data),
                "--out-dir",
                str(disk),
                "--name",
                "c",
            ],
            ["train", "--model", str(model), "--data", str(data), "--out-dir", str(disk / "runs"), "--steps", "1"],
        ],
        read_only=True,
    )
    assert_one_line_each(results, "read-only")
    assert snapshot(tmp_path / "after") == {}


def test_a_full_disk_keeps_what_was_there(world, tmp_path):
    """Each command onto a full disk: one line that says the disk is full, the earlier file or directory
    kept as it was, no temporary file or partial directory left behind (and no 0-byte config.yaml)."""
    root, model, data, run = world
    seed, disk = tmp_path / "seed", tmp_path / "disk"
    seed.mkdir()
    for name in ("a.gguf", "all.json", "page.html"):
        (seed / name).write_text(f"the earlier {name}")
    shutil.copytree(model, seed / "merged")  # an earlier merged model
    shutil.copytree(
        run,
        seed / "cut",
        ignore=lambda d, names: [
            n for n in names if Path(d) == run and n in ("adapter", "report.json", "report.txt", ".lock")
        ],
    )
    # (a run killed after its last checkpoint)
    compare = [
        "compare",
        "--methods",
        "lora",
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "1",
        "--out-dir",
        str(disk),
        "--name",
        "cmp",
        "--no-progress",
        "--no-html",
    ]
    (seed / "cmp").mkdir()  # a finished comparison, to be reported again
    shutil.copytree(run, seed / "cmp" / "lora", ignore=shutil.ignore_patterns(".lock"))
    (seed / "cmp" / "compare.json").write_text('{"the earlier": "compare.json"}')
    (seed / "cmp" / "compare.yaml").write_text(
        lorakit.compare.settings_text(resolve_train_config(build_parser("compare").parse_args(compare)), {})
    )
    results = batch(
        tmp_path,
        [
            ["export", "--adapter", str(run), "--out", str(disk / "a.gguf"), "--overwrite"],
            ["inspect", str(run), "--json", str(disk / "all.json"), "--html", str(disk / "page.html"), "--overwrite"],
            ["merge", "--adapter", str(run), "--out", str(disk / "merged"), "--overwrite"],
            ["train", "--resume", str(disk / "cut"), "--no-progress"],
            [
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--out-dir",
                str(disk / "runs"),
                "--name",
                "new",
                "--steps",
                "1",
                "--no-progress",
            ],
            compare,
        ],
        seed=seed,
        leave_free=0,
    )
    assert_one_line_each(results, "the disk is full")
    after = snapshot(tmp_path / "after")
    assert {name: digest for name, digest in after.items() if not name.endswith(".lock")} == snapshot(seed)
    assert not [name for name in after if ".tmp" in name or name.startswith("runs")]


def test_a_pipe_is_written_into_not_replaced(world, tmp_path):
    """`--json /dev/stdout` or a FIFO: the stream gets the output; the node itself stays (a rename over
    a device node would put a file in its place)."""
    import stat
    import threading

    _, _, _, run = world
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    assert cli.main(["inspect", str(run), "--json", str(pipe), "--no-html"]) == 0
    reader.join(timeout=60)
    assert json.loads(received[0]) and stat.S_ISFIFO(pipe.stat().st_mode)


def test_two_outputs_on_one_file_and_a_newline_in_a_path_are_one_line(world, tmp_path, capsys):
    _, _, _, run = world
    same = str(tmp_path / "both")
    assert cli.main(["inspect", str(run), "--json", same, "--html", same]) == 2
    assert "--json and --html name the same file" in error_line(capsys) and not os.path.exists(same)
    (tmp_path / "two\nlines").mkdir()
    assert cli.main(["inspect", str(run), "--json", str(tmp_path / "two\nlines"), "--no-html"]) == 2
    assert "two\\nlines is a directory" in error_line(capsys)


def test_compare_with_overwrite_trains_again_and_other_settings_need_it(world, tmp_path, capsys):
    _, model, data, _ = world
    flags = [
        "compare",
        "--methods",
        "lora",
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--out-dir",
        str(tmp_path),
        "--name",
        "cmp",
        "--no-progress",
        "--no-html",
    ]
    assert cli.main(flags) == 0
    first = (tmp_path / "cmp" / "lora" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main([*flags, "--steps", "2"]) == 2  # another comparison in that directory
    assert "holds a comparison with other settings" in error_line(capsys)
    assert cli.main([*flags, "--steps", "2", "--overwrite"]) == 0
    assert "already trained, reusing" not in capsys.readouterr().err
    assert (tmp_path / "cmp" / "lora" / "report.json").stat().st_mtime_ns != first
    assert json.loads((tmp_path / "cmp" / "lora" / "report.json").read_text())["steps"] == 2


def dead_pid() -> int:
    """The id of a process that has exited."""
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )


def test_explain_never_writes_over_the_base_model_or_the_run_and_not_through_a_broken_link(world, tmp_path, capsys):
    root, model, _, run = world
    for target in (model / "model.safetensors", run / "config.yaml"):
        before = target.read_bytes()
        assert cli.main(["explain", "--adapter", str(run), "hi", "--json", str(target), "--overwrite"]) == 2
        assert "an input of this command" in error_line(capsys)
        assert target.read_bytes() == before
    copy = tmp_path / "copy"  # a file deeper in the adapter's directory (a named adapter's, say)
    shutil.copytree(run, copy)
    (copy / "adapter" / "other").mkdir()
    (copy / "adapter" / "other" / "keep.json").write_text("{}")
    assert (
        cli.main(
            [
                "explain",
                "--adapter",
                str(copy),
                "hi",
                "--json",
                str(copy / "adapter" / "other" / "keep.json"),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "an input of this command" in error_line(capsys)
    assert (copy / "adapter" / "other" / "keep.json").read_text() == "{}"
    broken = tmp_path / "broken.html"
    broken.symlink_to(tmp_path / "missing" / "x.html")
    assert cli.main(["explain", "--adapter", str(run), "hi", "--html", str(broken)]) == 2
    assert "broken symbolic link" in error_line(capsys)


def test_explain_writes_through_a_link_and_removes_what_a_killed_explain_left(world, tmp_path, capsys):
    _, _, _, run = world
    real = tmp_path / "real.json"
    real.write_text("earlier")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    leftover = tmp_path / f".real.json.tmp-{dead_pid()}-0123abcd"
    leftover.write_text("half")
    assert (
        cli.main(
            [
                "explain",
                "--adapter",
                str(run),
                "Say 1:",
                "--completion",
                " 1",
                "--steps",
                "2",
                "--json",
                str(link),
                "--overwrite",
            ]
        )
        == 0
    )
    assert link.is_symlink() and json.loads(real.read_text())["inputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_trainer_checkpoint_files_are_written_atomically_and_leftovers_removed(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit import io
    from lorakit.integrations import checkpoints

    _, model_dir, _, run = world
    model = io.load(AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter")
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    stale = [
        checkpoint / f".{name}.tmp-{dead_pid()}-0123abcd"
        for name in ("adapter_model.safetensors", checkpoints.EXACT_STATE_NAME, checkpoints.HOOKS_STATE_NAME)
    ]
    for path in stale:
        path.write_text("half")
    io.save(model, checkpoint)
    checkpoints.save_training_state(checkpoint, model, None)
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        [
            "adapter_model.safetensors",
            "adapter_config.json",
            "lorakit.json",
            checkpoints.EXACT_STATE_NAME,
            checkpoints.HOOKS_STATE_NAME,
        ]
    )
