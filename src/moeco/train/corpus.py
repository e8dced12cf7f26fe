"""Where the training text comes from: the embedded corpus or the user's files.

The embedded corpus is the Python standard library's own documentation, read from the running
interpreter: the reference-manual topics in `pydoc_data.topics` (~0.5 MB of English prose about the
language) and the docstrings of the standard library's modules, classes and functions (~1.5 MB),
parsed from source with `ast` so nothing is imported or executed. Why this one: it is present in
every CPython install (no download, no hub, nothing large committed to the repository), it is real
technical English with a little code, and it is large enough (~2 MB, ~0.6 M tokens at a 4k vocabulary)
for the `tiny` preset to learn visible structure in minutes. Its exact bytes depend on the Python
version; the train/validation split is deterministic for a given corpus.

User data (`--data PATH`): a plain-text file (one document), a JSONL file (one document per line
in its `text` field), or a folder whose .txt/.md/.rst/.jsonl files are read in sorted path order.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

from moeco.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter",
                     "turtledemo", "__pycache__", "ensurepip", "venv"}


def load_documents(path: str) -> tuple[list[str], str]:
    """(documents, a one-line description of the source). Empty path: the embedded corpus."""
    docs, source = (embedded_corpus(), "embedded corpus: Python stdlib documentation") if not path \
        else _user_documents(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"the corpus at {path or 'embedded'!r} holds no text; give files with text in them")
    return docs, source


def embedded_corpus() -> list[str]:
    """The standard library's documentation as a list of documents, in a fixed order."""
    from pydoc_data import topics

    docs = [f"{name}\n\n{text.strip()}" for name, text in sorted(topics.topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(stdlib.rglob("*.py")):
        rel = file.relative_to(stdlib)
        if _SKIP_STDLIB_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        doc = _module_doc(file, ".".join(rel.with_suffix("").parts))
        if doc:
            docs.append(doc)
    return docs


def _module_doc(file: Path, module: str) -> str:
    """A module's docstring, then each documented class and function as `qualname` + docstring."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    top = ast.get_docstring(tree)
    if top:
        parts.append(f"{module}\n\n{top}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc and not child.name.startswith("_"):
                    parts.append(f"{name}\n    {doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(tree, module)
    return "\n\n".join(parts)


def _user_documents(path: str) -> tuple[list[str], str]:
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path {path!r} does not exist; pass a text file, a folder of "
                        f".txt/.md/.jsonl files, or a JSONL file with a 'text' field (omit --data for the "
                        f"embedded corpus)")
    if root.is_file():
        return _read_file(root), f"{path}"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
    if not files:
        raise DataError(f"data folder {path!r} has no .txt, .md, .rst or .jsonl files; put text files in it "
                        f"or pass a file")
    docs: list[str] = []
    for file in files:
        docs.extend(_read_file(file))
    return docs, f"{path} ({len(files)} files)"


def _read_file(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(file)!r} is not UTF-8 text (byte {exc.start}); convert it or leave it out") from None
    if file.suffix == ".json" and not _looks_like_jsonl(text):
        return _json_records(file, text)
    if file.suffix != ".jsonl" and not _looks_like_jsonl(text):
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(file)!r} line {lineno} is not valid JSON ({exc.msg}); "
                            f"each line must be an object with a 'text' field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{str(file)!r} line {lineno} has no string 'text' field; "
                            f'each line must look like {{"text": "..."}}')
        docs.append(record["text"])
    return docs


def _looks_like_jsonl(text: str) -> bool:
    """JSONL by content, whatever the file is called: the first non-blank line is a JSON object with a
    string 'text' field (a `.json` or `.txt` file of records must not be trained on as raw text)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get("text"), str)


def _json_records(file: Path, text: str) -> list[str]:
    """A `.json` file that is one JSON document: a list of {"text": ...} records."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(file)!r} is neither JSON nor JSONL ({exc.msg} at line {exc.lineno}); give JSONL "
                        f'records ({{"text": "..."}} per line) or rename it to .txt to train on it as text') from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str)
                                                for r in records):
        raise DataError(f"{str(file)!r} is JSON but not a list of records with a string 'text' field; give "
                        f'JSONL records ({{"text": "..."}} per line) or rename it to .txt to train on it as text')
    return [r["text"] for r in records]
