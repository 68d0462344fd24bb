"""Training data: reading files, recognising their layout, turning records into token ids.

Files are read with Hugging Face `datasets` (offline, the library the ecosystem reads data with):
`.jsonl` / `.json` (JSON Lines, a JSON list, or one object holding the list), `.csv` / `.tsv`
(a header row; TSV cells are taken as written, quotes included, as GLUE's files need),
`.parquet`, `.arrow`, and directories written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
(pick a split with `split`). Several files: a comma-separated list or a glob (`data/train-*.parquet`).
A UTF-8 byte-order mark is accepted; other encodings are refused with the line of the first bad
byte. Problems name the file and line (JSON Lines, CSV/TSV), item (JSON lists) or row (the rest).

Layouts, recognised from each record's columns after `columns` mapping (one layout per file):

| layout              | columns                                              | learns            |
|---------------------|------------------------------------------------------|-------------------|
| alpaca              | instruction, input?, output                          | output            |
| chat                | messages: [{role, content}, ...]                     | assistant turns   |
| prompt-completion   | prompt, completion                                   | completion        |
| text                | text                                                 | all tokens        |
| label               | text, text_pair?, label (classify: a class; regress: a number) | the label |

Well-known column names are mapped without flags (`KNOWN_COLUMNS`): GLUE's sentence pairs
(`sentence1`/`sentence2`, `question`/`sentence`, `question1`/`question2`, `premise`/`hypothesis`,
MRPC's `#1 String`/`#2 String`/`Quality`), `sentence`, a `score` target, GSM8K's
`question`/`answer`, Dolly's `instruction`/`context`/`response`. Other columns are ignored (and
reported); `--columns ROLE=COLUMN,...` maps anything else.

CSV/TSV files without a header row: GLUE's CoLA is read as shipped (`COLA_COLUMNS`); any other such
file is named by position, `--columns text=4,label=2` (from 1), and a first row that holds a
number is refused as a header.

The package, one job a module: `records` (layouts, roles, where a record came from), `reading`
(files), `diagnosis` (one line that names the place of a problem), `columns` (roles and layouts),
`encoding` (token ids), `batching` (held-out split, micro-batches, padding).
"""

from .batching import collate, epoch_order, evenly_spaced, micro_batch, split_held_out
from .columns import (
    check_column_roles,
    check_records,
    describe_mapping,
    detect_format,
    map_columns,
    parse_columns,
    recognise_columns,
)
from .encoding import (
    Example,
    alpaca_prompt,
    apply_prompt_template,
    chat_ids,
    check_prompt_template,
    data_name,
    encode_causal,
    encode_classify,
    encode_regress,
    has_chat_template,
    label_names,
    label_text,
    prompt_completion_ids,
    regression_target,
    render_chat,
    text_ids,
    to_prompt_completion,
)
from .reading import data_files, read_records, read_table, saved_splits
from .records import (
    FORMATS,
    GENERATION_COLUMNS,
    IGNORE_INDEX,
    KNOWN_COLUMNS,
    LABEL_COLUMNS,
    PAIR_COLUMNS,
    ROLES,
    SUFFIXES,
    TEXT_COLUMNS,
    Origin,
    Record,
    Where,
)
