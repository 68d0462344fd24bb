"""Data as users have it: CSV/TSV rows of another width than the header are refused at their line
(pandas would read them wrong), header names with spaces and trailing blank rows are read, saved
datasets whose dataset_dict.json is damaged are one line."""

from __future__ import annotations

import pytest

from conftest import shared_dataset
from lorakit.errors import LorakitError
from lorakit.train import data


def rows(path, task="classify"):
    return [(r.data, str(r.source)) for r in data.read_records(path, task=task)]


@pytest.mark.parametrize(
    "name, content",
    [
        # one field more in every row: pandas took the first column as an index (text '1', label 'pos')
        ("extra.tsv", "sentence\tlabel\ngood movie\t1\tpos\nbad movie\t0\tneg\n"),
        ("extra.csv", "sentence,label\ngood movie,1,pos\nbad movie,0,neg\n"),
        # one field fewer: the label was missing without a word
        ("short.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\n"),
    ],
)
def test_a_row_of_another_width_than_the_header_is_an_error_at_its_line(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    line = 3 if name.startswith("short") else 2
    with pytest.raises(
        LorakitError, match=rf"{name}:{line}: expected 2 columns, found \d \(the header names"
    ) as caught:
        data.read_records(tmp_path / name, task="classify")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "name, content, columns",
    [
        # a file without a header row, read by position: its first row sets the width
        ("plain.tsv", "good movie\t1\nbad movie\t0\textra\n", {"text": "1", "label": "2"}),
        ("plain.csv", "good movie,1\nbad movie\n", {"text": "1", "label": "2"}),
        # GLUE's CoLA, read as shipped (four columns)
        (
            "train.tsv",
            "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThey drank the pub.\tx\n",
            None,
        ),
    ],
)
def test_a_row_of_another_width_in_a_file_without_a_header_is_an_error_at_its_line(tmp_path, name, content, columns):
    (tmp_path / name).write_text(content)
    with pytest.raises(LorakitError, match=rf"{name}:2: expected \d columns, as in the first row, found \d") as caught:
        data.read_records(tmp_path / name, columns=columns, task="classify")
    assert "\n" not in str(caught.value)
    (tmp_path / name).write_text(
        content.split("\n")[0] + "\n" + content.split("\n")[0] + "\n\n\n"
    )  # trailing blank rows
    assert len(data.read_records(tmp_path / name, columns=columns, task="classify")) == 2


@pytest.mark.parametrize(
    "name, content",
    [
        ("spaces.tsv", " sentence \t label \ngood movie\t1\nbad movie\t0\n"),
        ("spaces.csv", " sentence , label \ngood movie,1\nbad movie,0\n"),
    ],
)
def test_header_names_with_spaces_are_read(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert [d for d, _ in rows(tmp_path / name)] == [
        {"text": "good movie", "label": "1"},
        {"text": "bad movie", "label": "0"},
    ]


@pytest.mark.parametrize(
    "name, content",
    [
        ("trailing.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\t0\n\n\t\n  \t \n"),
        ("trailing.csv", "sentence,label\ngood movie,1\nbad movie,0\n,\n\n"),
    ],
)
def test_trailing_blank_rows_are_ignored(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert rows(tmp_path / name) == [
        ({"text": "good movie", "label": "1"}, f"{tmp_path / name}:2"),
        ({"text": "bad movie", "label": "0"}, f"{tmp_path / name}:3"),
    ]


def test_a_blank_row_inside_keeps_the_lines_of_the_rows_after_it(tmp_path):
    (tmp_path / "gap.tsv").write_text("sentence\tlabel\ngood\t1\n\t\nbad\t\n")
    found, _ = data.map_columns(data.read_table(tmp_path / "gap.tsv"), {}, "classify", "gap.tsv")
    with pytest.raises(LorakitError, match=r"gap\.tsv:4: empty label"):
        data.label_names(found)


def test_a_header_and_blank_rows_have_no_examples(tmp_path):
    (tmp_path / "none.tsv").write_text("sentence\tlabel\n\t\n\n")
    with pytest.raises(LorakitError, match=r"none\.tsv: no examples"):
        data.read_records(tmp_path / "none.tsv", task="classify")


def test_sst2_reads_whole():
    path = shared_dataset("sst2", "dev.tsv")
    found = data.read_records(path, task="classify")
    assert len(found) == sum(1 for line in path.read_text().splitlines()[1:] if line.strip())
    assert {r.data["label"] for r in found} == {"0", "1"}


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    path = tmp_path_factory.mktemp("saved") / "dict"
    rows = {"text": ["good", "bad", "fine", "ugly"], "label": ["1", "0", "1", "0"]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(path)
    return path


@pytest.mark.parametrize(
    "content",
    [
        '{"splits": "train"}',
        '{"splits": 5}',
        '{"splits": [1, 2]}',
        '{"splits": null}',
        '{"splits": []}',
        '{"splits": ["../other"]}',
        '{"splits": [".."]}',
        '{"splits": [""]}',
        '["train"]',
        "{}",
        "not json",
        '{"splits": ' + "[" * 50_000 + "]" * 50_000 + "}",
    ],
)
def test_a_damaged_dataset_dict_json_is_one_line(tmp_path, saved_dict, content):
    import shutil

    copy = tmp_path / "dict"
    shutil.copytree(saved_dict, copy)
    (copy / "dataset_dict.json").write_text(content)
    with pytest.raises(LorakitError, match=r"dataset_dict\.json") as caught:
        data.read_records(copy, task="classify")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_saved_dataset_dict_still_reads(saved_dict):
    assert [r.data["text"] for r in data.read_records(saved_dict, task="classify")] == ["good", "bad", "fine", "ugly"]
    assert data.saved_splits(saved_dict) == ["train", "validation"]


def test_a_misspelt_column_gets_the_closest_name(tmp_path):
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood movie\t1\n")
    with pytest.raises(
        LorakitError,
        match=r"--columns names \['sentense'\], which the data does not have; its columns: "
        r"sentence, label \(did you mean 'sentence'\?\)",
    ):
        data.read_records(tmp_path / "d.tsv", columns={"text": "sentense"}, task="classify")
