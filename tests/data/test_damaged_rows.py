"""Damaged user files: a row that is not UTF-8 is skipped and reported as ``file:line: reason`` (the others kept), a
byte-order mark is ignored, and a file in another encoding stops with one error that says how to convert it."""
import json

import pytest

from lit_lowrank.data import InstructionDataModule, TextClassificationDataModule
from lit_lowrank.data.common import read_table
from lit_lowrank.data.instruction_rows import read_rows
from lit_lowrank.data.text import read_text_documents
from lit_lowrank.data.user_files import BadRow, NotUtf8Error


def jsonl_bytes(*rows):
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in rows)


# `{"prompt": "caf` is 15 characters: the Latin-1 e-acute (0xE9) that follows is column 16.
LATIN1_ROW = b'{"prompt": "caf\xe9", "response": "x"}'


def only_message(caught, text):
    (message,) = {str(w.message) for w in caught if text in str(w.message)}
    return message


def test_jsonl_row_that_is_not_utf8_is_reported_with_file_line_and_column_and_the_others_kept(tmp_path):
    path = tmp_path / "train.jsonl"
    good = [{"prompt": "a", "response": "b"}, {"prompt": "caf\u00e9", "response": "d"}]
    path.write_bytes(jsonl_bytes(good[0], LATIN1_ROW, good[1]))
    assert list(read_rows(path)) == [
        (f"{path}:1", {"prompt": "a", "response": "b"}),
        (f"{path}:2", BadRow(f"{path}:2", "not UTF-8: byte 0xE9 at column 16")),
        (f"{path}:3", {"prompt": "caf\u00e9", "response": "d"})]


def test_instruction_module_skips_the_row_and_says_to_save_as_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(3)]
    path.write_bytes(jsonl_bytes(rows[0], LATIN1_ROW, rows[1], rows[2]))
    dm = InstructionDataModule(str(path), val_file=str(path), max_length=16)
    with pytest.warns(UserWarning) as caught:
        dm.read_examples()
    message = only_message(caught, "not usable")
    assert f"1 of 4 rows of {path} are not usable examples:\n  {path}:2: not UTF-8: byte 0xE9 at column 16\n" in message
    assert "save the file as UTF-8" in message
    assert dm.bad_rows[0] == BadRow(f"{path}:2", "not UTF-8: byte 0xE9 at column 16")


def test_excel_csv_with_a_bom_has_its_first_column_name_without_it(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,response\nhi,there\n", encoding="utf-8-sig")  # as Excel's "CSV UTF-8" saves it
    assert path.read_bytes().startswith(b"\xef\xbb\xbfprompt")
    assert list(read_rows(path)) == [(f"{path}:2", {"prompt": "hi", "response": "there"})]
    assert read_table(path) == ([{"prompt": "hi", "response": "there"}], ["prompt", "response"])
    assert TextClassificationDataModule(str(path), text_field="prompt", label_field="response").class_names == ["there"]


def test_bom_is_ignored_in_jsonl_tsv_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n', encoding="utf-8-sig")
    (tmp_path / "a.tsv").write_text("text\tlabel\nx\t1\n", encoding="utf-8-sig")
    (tmp_path / "a.txt").write_text("first line\n", encoding="utf-8-sig")
    assert read_table(tmp_path / "a.jsonl") == ([{"text": "x", "label": 1}], ["text", "label"])
    assert read_table(tmp_path / "a.tsv") == ([{"text": "x", "label": "1"}], ["text", "label"])
    assert read_text_documents(str(tmp_path / "a.txt")) == [("a.txt", "first line\n")]


def test_crlf_csv_reports_the_bad_row_at_its_line_and_keeps_multiline_cells(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,response\r\n"two\r\nlines",yes\r\nbad \xff here,no\r\nlast,one\r\n')
    assert list(read_rows(path)) == [
        (f"{path}:2", {"prompt": "two\r\nlines", "response": "yes"}),
        (f"{path}:4", BadRow(f"{path}:4", "not UTF-8: byte 0xFF at character 5 of 'prompt'")),
        (f"{path}:5", {"prompt": "last", "response": "one"})]


def test_labelled_table_skips_the_row_with_a_warning_listing_it(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\r\ngood film,pos\r\n\r\nbad film,neg\r\nna\xefve film,pos\r\nok,neg\r\n")
    with pytest.warns(UserWarning) as caught:
        rows, columns = read_table(path)
    assert rows == [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
                    {"text": "ok", "label": "neg"}] and columns == ["text", "label"]
    message = only_message(caught, "skipped")
    assert message.startswith(f"1 of 4 rows of {path} are skipped:\n  {path}:5: not UTF-8: byte 0xEF at "
                              "character 3 of 'text'\nHINT: save it as UTF-8")


def test_text_corpus_leaves_out_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntw\xf6\r\nthree\r\nfour\r\n")
    with pytest.warns(UserWarning) as caught:
        documents = read_text_documents(str(path))
    assert documents == [("corpus.txt", "one\nthree\nfour\n")]
    assert f"{path}:2: not UTF-8: byte 0xF6 at column 3" in only_message(caught, "left out")


@pytest.mark.parametrize("name, counted, first", [
    ("rows.jsonl", "3 of 4 rows", "1: not UTF-8: byte 0xE9 at column 16"),  # `{"prompt": "caf` is 15 characters
    ("rows.csv", "3 of 4 rows", "2: not UTF-8: byte 0xE9 at character 4 of 'prompt'"),
    ("corpus.txt", "3 of 5 lines", "2: not UTF-8: byte 0xE9 at column 4")])
def test_a_latin1_file_stops_with_one_error_naming_it_and_the_fix(tmp_path, name, counted, first):
    path = tmp_path / name
    lines = ["prompt,response", "caf\u00e9,cr\u00e8me", "na\u00efve,x", "plain,ascii", "\u00fcber,y"]
    if name.endswith(".jsonl"):
        lines = [json.dumps({"prompt": line}, ensure_ascii=False) for line in lines[1:]]
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    read = {".txt": lambda: read_text_documents(str(path)), ".csv": lambda: read_table(path),
            ".jsonl": lambda: list(read_rows(path))}[path.suffix]
    with pytest.raises(NotUtf8Error) as error:
        read()
    assert str(error.value).startswith(f"{path} is not UTF-8 text: {counted} hold bytes that are not UTF-8 (first: "
                                       f"{path}:{first}), so it was saved in another encoding")
    assert str(error.value).endswith(f"`iconv -f WINDOWS-1252 -t UTF-8 {name} > utf8-{name}`")


@pytest.mark.parametrize("encoding, problem", [
    ("utf-16", "it is UTF-16 (it starts with a UTF-16 byte-order mark)"),  # Excel's "Unicode Text"
    ("utf-16-le", "it holds NUL bytes (UTF-16 without a byte-order mark, or not a text file)")])
def test_a_utf16_file_stops_before_reading_rows(tmp_path, encoding, problem):
    path = tmp_path / "excel.csv"
    path.write_text("text,label\nhi,1\n", encoding=encoding)
    with pytest.raises(NotUtf8Error) as error:
        TextClassificationDataModule(str(path)).setup()
    assert str(error.value).startswith(f"{path} is not UTF-8 text: {problem}. HINT: save it as UTF-8")


def test_a_header_that_is_not_utf8_stops_at_line_1(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,cat\xe9gorie\nhello,a\nhi,b\n")
    with pytest.raises(NotUtf8Error) as error:
        read_table(path)
    assert str(error.value).startswith(f"{path}:1: the header row is not UTF-8: byte 0xE9 at character 4 of cell 2. "
                                       "HINT: save it as UTF-8")
