"""Text decoding and cleaning for document datasets (OpenWebText), as the reference does it.

Cleaning, per document (as the thesis code and the OpenWebText loading script do it; docs/datasets/openwebtext.md):
1. every line is stripped of surrounding whitespace;
2. empty lines, lines equal to `---` and lines containing a NUL character are dropped;
3. what is left is joined with newlines, and runs of 3+ newlines collapse to 2 (after step 2
   this can only happen when a kept line itself holds a `\\r`-style break; the rule is kept so
   the behaviour matches the loading script whatever the input).
Switched off (`--no-clean`), the text is written exactly as decoded. The trainer cleans the raw
`txt` members it tokenises itself with the same `clean_text`.
"""

from __future__ import annotations

import re

from shardify.records import Reject

_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """The reference cleaning of a document, applied before tokenising: per line, strip; drop
    empty lines, lines equal to `---` and lines holding NUL; join with newlines and collapse
    runs of 3+ newlines to 2."""
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "---" or "\x00" in line:
            continue
        kept.append(line)
    return _MANY_NEWLINES.sub("\n\n", "\n".join(kept))


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 decoding; invalid bytes are a recorded reject, never silently replaced."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Reject("undecodable", f"invalid UTF-8 at byte {exc.start}: {exc.reason}") from None


def prepare_document(data: bytes, clean: bool) -> str:
    """Decode (and clean) one document; raise Reject when nothing is left to write."""
    text = decode_utf8(data)
    if clean:
        text = clean_text(text)
    if not text.strip():
        raise Reject("empty", "no text left after cleaning" if clean else "document is empty")
    return text
