"""Quiz items and MMLU-format CSV files (`testbed-quiz`; definitions: testbed/analysis/quiz.py): an item,
writing and reading one file, and finding the files of a quiz directory (MMLU's `*_test.csv` layout)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError

LETTERS = "ABCD"


class QuizError(TestbedError):
    """A quiz file or quiz setting that cannot be used; the message names the file (and row)."""


@dataclass(frozen=True)
class QuizItem:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: int  # index of the right option, 0..3 (A..D)
    source: str = ""  # file it was read from
    row: int = 0  # 1-based record number in that file

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


# ----------------------------------------------------------------------------------------------- CSV files


def write_quiz_csv(path: str | Path, items: Iterable[QuizItem]) -> None:
    """MMLU's format: no header, one record per item, question,A,B,C,D,answer with CSV quoting (fields with a
    comma, quote or line break are quoted, quotes doubled)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        for item in items:
            writer.writerow([item.question, *item.options, item.letter])


def subject_of(path: Path) -> str:
    return path.stem.removesuffix("_test")


def read_quiz_csv(path: str | Path) -> list[QuizItem]:
    """The items of one MMLU-format file; a QuizError naming the file and row for any malformed record."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise QuizError(f"quiz file {path}: cannot be read ({err})") from err
    except UnicodeDecodeError as err:
        raise QuizError(f"quiz file {path} is not valid UTF-8 (byte {err.start}: {err.reason})") from err
    subject = subject_of(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    items = []
    record = 0
    try:
        for row in reader:
            if not row:  # a blank line
                continue
            record += 1
            where = f"quiz file {path}, row {record} (line {reader.line_num})"
            if len(row) != 6:
                raise QuizError(
                    f"{where}: {len(row)} columns; MMLU format has 6 (question,A,B,C,D,answer) and no header"
                )
            answer = row[5].strip()
            if answer not in tuple(LETTERS):  # a tuple: "" and "AB" are substrings of "ABCD", not letters
                hint = " (a header row? MMLU files have none)" if record == 1 else ""
                raise QuizError(f"{where}: answer {row[5]!r} is not one of A, B, C, D{hint}")
            items.append(QuizItem(subject, row[0], tuple(row[1:5]), LETTERS.index(answer), str(path), record))
    except csv.Error as err:
        raise QuizError(f"quiz file {path}, line {reader.line_num}: not valid CSV ({err})") from err
    if not items:
        raise QuizError(f"quiz file {path} holds no items")
    return items


def quiz_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """CSV files named by `paths`: files as given; a directory gives its `*_test.csv` files, or those of its
    `test/` or `data/test/` folder (the hendrycks MMLU layout)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            for folder in (path, path / "test", path / "data" / "test"):
                found = sorted(folder.glob("*_test.csv"))
                if found:
                    files.extend(found)
                    break
            else:
                raise QuizError(
                    f"quiz directory {path} holds no *_test.csv files, nor does {path}/test or "
                    f"{path}/data/test (expected MMLU's layout or the output of `testbed-quiz build`)"
                )
        elif path.is_file():
            files.append(path)
        else:
            raise QuizError(f"quiz path {path} does not exist")
    if not files:
        raise QuizError("no quiz files given")
    return files


def load_quiz(paths: str | Path | Sequence[str | Path]) -> list[QuizItem]:
    """All items of the quiz files named by `paths` (see `quiz_files`), file by file, in file order."""
    return [item for file in quiz_files(paths) for item in read_quiz_csv(file)]
