"""lightning_md4.tables: the one Markdown table writer (zero-shot table, sweep report, benchmarks)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT
from lightning_md4.tables import markdown_table


def test_cells_are_kept_as_formatted_and_numbers_right_aligned():
    rows = [{"method": "MD4", "bpt": "3.6000", "steps": 100, "loss": 0.123456789, "note": None},
            {"method": "a|b", "bpt": "3.5500 +- 0.0500", "steps": 20, "loss": float("nan"), "note": "x"}]
    assert markdown_table(rows, pad=False).splitlines() == [
        "| method | bpt | steps | loss | note |",
        "|---|---|---:|---:|---|",
        "| MD4 | 3.6000 | 100 | 0.123457 |  |",
        "| a\\|b | 3.5500 +- 0.0500 | 20 | nan | x |",
    ]


def test_padded_tables_read_as_plain_text():
    lines = markdown_table([{"method": "MD4", "steps/s": 1.5}, {"method": "GenMD4", "steps/s": 12.25}]).splitlines()
    assert lines == ["| method | steps/s |",
                     "|--------|--------:|",
                     "| MD4    |     1.5 |",
                     "| GenMD4 |   12.25 |"]


def test_a_data_frame_with_its_index_and_a_float_format():
    frame = pd.DataFrame({"n": [3, 4], "mean": [1.23456, 2.0]},
                         index=pd.Index(["x=1", "x=2"], name="configuration"))
    lines = markdown_table(frame, index=True, floatfmt=".4g", pad=False).splitlines()
    assert lines == ["| configuration | n | mean |", "|---|---:|---:|", "| x=1 | 3 | 1.235 |", "| x=2 | 4 | 2 |"]
    assert markdown_table(frame, pad=False).splitlines()[0] == "| n | mean |"


def test_explicit_alignment_is_checked():
    assert markdown_table([{"a": "1", "b": "2"}], align="lr", pad=False).splitlines()[1] == "|:---|---:|"
    with pytest.raises(ValueError, match="one of l, r, - per column"):
        markdown_table([{"a": 1}], align="lr")


def test_it_imports_neither_torch_nor_pandas():
    code = "import sys, lightning_md4.tables\nassert not {'torch', 'pandas'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
