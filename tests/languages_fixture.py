"""A tiny languages mix, built offline from synthetic manual pages, for tests.

``build_tiny_languages_mix(tmp_path)`` writes gzipped groff pages for the 8 languages of the
languages mix (laid out like Debian's ``/usr/share/man/<lang>/man*/`` with dpkg file lists),
points :mod:`testbed.data.corpora` at them, and builds the mix and its tokenizer with
``testbed-data`` into ``tmp_path``. Train on it with ``data=languages data.root=<root>
data.tokenizer=<tokenizer>`` (and a model vocabulary of at least ``vocab_size``). It needs the
``groff`` program (Debian groff-base); without it the calling test is skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.data import build, corpora

GROFF_MISSING = shutil.which(corpora.GROFF) is None
SKIP_REASON = f"the {corpora.GROFF} program is not installed (apt-get install groff-base)"
requires_groff = pytest.mark.skipif(GROFF_MISSING, reason=SKIP_REASON)

# Section headings (NAME, SYNOPSIS, DESCRIPTION, OPTIONS, EXAMPLES, SEE ALSO), the one-line summary,
# six sentences about a made-up `hello` command and three option descriptions, per language.
LANGUAGE_TEXT: dict[str, dict] = {
    "de": {
        "sections": ["BEZEICHNUNG", "ÜBERSICHT", "BESCHREIBUNG", "OPTIONEN", "BEISPIELE", "SIEHE AUCH"],
        "summary": "gibt einen freundlichen Gruß aus",
        "sentences": [
            "Das Programm hello schreibt einen Gruß auf die Standardausgabe.",
            "Ohne Argumente begrüßt es die ganze Welt.",
            "Wird ein Name angegeben, so wird stattdessen diese Person begrüßt.",
            "Die Sprache der Ausgabe richtet sich nach der Umgebungsvariable LANG.",
            "Fehler werden auf die Standardfehlerausgabe geschrieben.",
            "Der Rückgabewert ist null, wenn der Gruß erfolgreich ausgegeben wurde.",
        ],
        "options": [
            "Begrüßt die angegebene Person.",
            "Unterdrückt alle Meldungen außer dem Gruß.",
            "Zeigt die Versionsnummer an und beendet das Programm.",
        ],
    },
    "fr": {
        "sections": ["NOM", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXEMPLES", "VOIR AUSSI"],
        "summary": "affiche une salutation amicale",
        "sentences": [
            "Le programme hello écrit une salutation sur la sortie standard.",
            "Sans argument, il salue le monde entier.",
            "Si un nom est indiqué, c'est cette personne qui est saluée.",
            "La langue de la sortie dépend de la variable d'environnement LANG.",
            "Les erreurs sont écrites sur la sortie d'erreur standard.",
            "Le code de retour vaut zéro lorsque la salutation a été affichée.",
        ],
        "options": [
            "Salue la personne indiquée.",
            "Supprime tous les messages sauf la salutation.",
            "Affiche le numéro de version et quitte.",
        ],
    },
    "es": {
        "sections": ["NOMBRE", "SINOPSIS", "DESCRIPCIÓN", "OPCIONES", "EJEMPLOS", "VÉASE TAMBIÉN"],
        "summary": "muestra un saludo amistoso",
        "sentences": [
            "El programa hello escribe un saludo en la salida estándar.",
            "Sin argumentos, saluda al mundo entero.",
            "Si se indica un nombre, saluda a esa persona en su lugar.",
            "El idioma de la salida depende de la variable de entorno LANG.",
            "Los errores se escriben en la salida de error estándar.",
            "El código de salida es cero cuando el saludo se ha mostrado correctamente.",
        ],
        "options": [
            "Saluda a la persona indicada.",
            "Suprime todos los mensajes excepto el saludo.",
            "Muestra el número de versión y termina.",
        ],
    },
    "it": {
        "sections": ["NOME", "SINTASSI", "DESCRIZIONE", "OPZIONI", "ESEMPI", "VEDERE ANCHE"],
        "summary": "stampa un saluto amichevole",
        "sentences": [
            "Il programma hello scrive un saluto sullo standard output.",
            "Senza argomenti saluta il mondo intero.",
            "Se viene indicato un nome, saluta invece quella persona.",
            "La lingua dell'output dipende dalla variabile d'ambiente LANG.",
            "Gli errori vengono scritti sullo standard error.",
            "Il codice di uscita è zero quando il saluto è stato stampato correttamente.",
        ],
        "options": [
            "Saluta la persona indicata.",
            "Sopprime tutti i messaggi tranne il saluto.",
            "Mostra il numero di versione ed esce.",
        ],
    },
    "nl": {
        "sections": ["NAAM", "SYNOPSIS", "BESCHRIJVING", "OPTIES", "VOORBEELDEN", "ZIE OOK"],
        "summary": "drukt een vriendelijke groet af",
        "sentences": [
            "Het programma hello schrijft een groet naar de standaarduitvoer.",
            "Zonder argumenten begroet het de hele wereld.",
            "Als een naam wordt opgegeven, wordt in plaats daarvan die persoon begroet.",
            "De taal van de uitvoer hangt af van de omgevingsvariabele LANG.",
            "Foutmeldingen worden naar de standaardfoutuitvoer geschreven.",
            "De afsluitwaarde is nul als de groet met succes is afgedrukt.",
        ],
        "options": [
            "Begroet de opgegeven persoon.",
            "Onderdrukt alle meldingen behalve de groet.",
            "Toont het versienummer en sluit af.",
        ],
    },
    "pl": {
        "sections": ["NAZWA", "SKŁADNIA", "OPIS", "OPCJE", "PRZYKŁADY", "ZOBACZ TAKŻE"],
        "summary": "wypisuje przyjazne powitanie",
        "sentences": [
            "Program hello wypisuje powitanie na standardowe wyjście.",
            "Bez argumentów wita cały świat.",
            "Jeśli podano imię, program wita zamiast tego tę osobę.",
            "Język komunikatów zależy od zmiennej środowiskowej LANG.",
            "Błędy są wypisywane na standardowe wyjście błędów.",
            "Kod wyjścia wynosi zero, jeśli powitanie zostało wypisane poprawnie.",
        ],
        "options": [
            "Wita podaną osobę.",
            "Pomija wszystkie komunikaty poza powitaniem.",
            "Wyświetla numer wersji i kończy działanie.",
        ],
    },
    "ru": {
        "sections": ["ИМЯ", "ОБЗОР", "ОПИСАНИЕ", "ПАРАМЕТРЫ", "ПРИМЕРЫ", "СМОТРИТЕ ТАКЖЕ"],
        "summary": "выводит дружеское приветствие",
        "sentences": [
            "Программа hello выводит приветствие на стандартный вывод.",
            "Без аргументов она приветствует весь мир.",
            "Если указано имя, вместо этого приветствуется этот человек.",
            "Язык вывода зависит от переменной окружения LANG.",
            "Сообщения об ошибках выводятся в стандартный поток ошибок.",
            "Код возврата равен нулю, если приветствие было успешно выведено.",
        ],
        "options": [
            "Приветствует указанного человека.",
            "Подавляет все сообщения, кроме приветствия.",
            "Показывает номер версии и завершает работу.",
        ],
    },
    "ja": {
        "sections": ["名前", "書式", "説明", "オプション", "例", "関連項目"],
        "summary": "親しみやすい挨拶を表示する",
        "sentences": [
            "hello プログラムは標準出力に挨拶を書き出す。",
            "引数を指定しない場合は、世界全体に挨拶する。",
            "名前を指定すると、代わりにその人に挨拶する。",
            "出力の言語は環境変数 LANG によって決まる。",
            "エラーは標準エラー出力に書き出される。",
            "挨拶が正しく表示された場合、終了ステータスは 0 になる。",
        ],
        "options": [
            "指定した人に挨拶する。",
            "挨拶以外のすべてのメッセージを抑制する。",
            "バージョン番号を表示して終了する。",
        ],
    },
}


def hello_page(language: str) -> str:
    """groff source of the user page hello(1): fonts, escapes, a tagged list and an example."""
    t = LANGUAGE_TEXT[language]
    name, synopsis, description, options, examples, see_also = t["sections"]
    s, o = t["sentences"], t["options"]
    return "\n".join(
        [
            '.\\" Synthetic manual page written for the testbed tests.',
            '.TH HELLO 1 "2024-01-01" "hello 1.0" "hello"',
            f".SH {name}",
            f"hello \\- {t['summary']}",
            f'.SH "{synopsis}"',
            ".B hello",
            "[\\fB\\-q\\fR] [\\fB\\-n\\fR \\fINAME\\fR]",
            f'.SH "{description}"',
            *s[:3],
            ".PP",
            *s[3:],
            f'.SH "{options}"',
            ".TP",
            "\\fB\\-n\\fR, \\fB\\-\\-name\\fR=\\fINAME\\fR",
            o[0],
            ".TP",
            '.BR \\-q ", " \\-\\-quiet',
            o[1],
            ".TP",
            "\\fB\\-v\\fR, \\fB\\-\\-version\\fR",
            o[2],
            f'.SH "{examples}"',
            ".nf",
            ".RS",
            "\\fB$ hello \\-n \\(dqAda Lovelace\\(dq\\fP",
            "\\fB$ hello | tr \\(aq[:lower:]\\(aq \\(aq[:upper:]\\(aq\\fP",
            ".RE",
            ".fi",
            f'.SH "{see_also}"',
            ".BR greetings (7),",
            ".BR echo (1)",
            "",
        ]
    )


def greetings_page(language: str) -> str:
    """groff source of the overview page greetings(7): hyphenation switched on, a tbl table and
    indented paragraphs."""
    t = LANGUAGE_TEXT[language]
    name, _, description, options, _, see_also = t["sections"]
    s, o = t["sentences"], t["options"]
    return "\n".join(
        [
            "'\\\" t",
            '.\\" Synthetic manual page written for the testbed tests.',
            '.TH GREETINGS 7 "2024-01-01" "hello 1.0" "hello"',
            ".hy",  # as some real pages do: switch hyphenation (back) on
            f".SH {name}",
            f"greetings \\- {t['summary']}",
            f'.SH "{description}"',
            *reversed(s),
            ".PP",
            *s[1::2],
            f'.SH "{options}"',
            ".TS",
            "l l.",
            f"\\-n\t{o[0]}",
            f"\\-q\t{o[1]}",
            f"\\-v\t{o[2]}",
            ".TE",
            ".IP \\(bu 3",
            s[0],
            ".IP \\(bu",
            s[3],
            f'.SH "{see_also}"',
            ".BR hello (1)",
            "",
        ]
    )


def write_man_tree(base: Path) -> tuple[Path, Path]:
    """Write the pages of every language under ``base/man/<lang>/man*/`` as Debian lays them out,
    with dpkg file lists under ``base/dpkg``: per language the packages ``manpages-<lang>`` (hello(1),
    its `.so` redirect hi(1) and its symbolic link hallo(1)) and ``manpages-<lang>-dev``
    (greetings(7)); a page outside both lists (other(1)) must be ignored. Returns (man root, dpkg dir).
    """
    man_root, dpkg_dir = base / "man", base / "dpkg"
    dpkg_dir.mkdir(parents=True, exist_ok=True)
    for language in corpora.LANGUAGE_NAMES:
        pages = {
            "man1/hello.1": hello_page(language),
            "man1/hi.1": '.\\" redirect\n.so man1/hello.1\n',
            "man7/greetings.7": greetings_page(language),
            "man1/other.1": hello_page(language).replace("hello", "other"),
        }
        for relative, source in pages.items():
            path = man_root / language / f"{relative}.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(source.encode("utf-8"), mtime=0))
        link = man_root / language / "man1" / "hallo.1.gz"
        if not link.is_symlink():
            link.symlink_to("hello.1.gz")
        user, dev = corpora.man_packages(language)
        prefix = f"{corpora.DEBIAN_MAN_DIR}/{language}"
        user_files = ["man1/hello.1.gz", "man1/hi.1.gz", "man1/hallo.1.gz"]
        (dpkg_dir / f"{user}.list").write_text(
            "\n".join(["/.", "/usr/share/doc/" + user] + [f"{prefix}/{f}" for f in user_files]) + "\n"
        )
        (dpkg_dir / f"{dev}.list").write_text(f"/.\n{prefix}/man7/greetings.7.gz\n")
    return man_root, dpkg_dir


@contextlib.contextmanager
def man_pages_at(man_root: Path, dpkg_dir: Path) -> Iterator[None]:
    """Point the languages sources of :mod:`testbed.data.corpora` at a tree from :func:`write_man_tree`."""
    saved = corpora.MAN_ROOT, corpora.DPKG_INFO_DIR
    corpora.MAN_ROOT, corpora.DPKG_INFO_DIR = man_root, dpkg_dir
    try:
        yield
    finally:
        corpora.MAN_ROOT, corpora.DPKG_INFO_DIR = saved


def build_tiny_languages_mix(tmp_path: Path, vocab_size: int = 512) -> tuple[Path, Path]:
    """Build the 8-language mix from synthetic pages into ``tmp_path/languages``, with a tokenizer of
    at most ``vocab_size`` entries; returns (root, tokenizer path). Skips the test without groff.

    Each language holds 2 documents (about 1 KB each, one is held out for validation), so use short
    sequences (``data.seq_len=32``) with it.
    """
    if GROFF_MISSING:
        pytest.skip(SKIP_REASON)
    man_root, dpkg_dir = write_man_tree(tmp_path / "sources")
    root = tmp_path / "languages"
    tokenizer = root / "tokenizer.json"
    argv = ["--out", str(root), "--domains", ",".join(corpora.LANGUAGES_MIX)]
    argv += ["--tokenizer", str(tokenizer), "--vocab-size", str(vocab_size)]
    with man_pages_at(man_root, dpkg_dir), contextlib.redirect_stdout(io.StringIO()):
        if build.main(argv) != 0:
            raise RuntimeError(f"testbed-data {' '.join(argv)} failed")
    return root, tokenizer
