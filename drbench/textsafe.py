"""Text from results records made safe for the formats drbench writes: Markdown (reports, pull-request comments)
and CSV (opened in spreadsheets). Records are untrusted input: a value must show as the text it is, never as HTML,
a heading, a link or a formula.

This module is a leaf: it imports nothing of drbench.

>>> markdown_text("<img src=x onerror=alert(1)>\\n# heading")
'\\\\<img src=x onerror=alert(1)> # heading'
>>> markdown_code("a`b")
'`` a`b ``'
>>> spreadsheet_text("=HYPERLINK(\\"http://x\\")"), spreadsheet_text("-0.5"), spreadsheet_text(-0.5)
('\\'=HYPERLINK("http://x")', "'-0.5", -0.5)
"""

from __future__ import annotations

import re
from typing import Any

# What can start markup inline (a line's start cannot be reached: values are never first on a line): emphasis, code,
# links, tables, strike-through, entities; `_` only at a word's edge (GFM ignores it inside words), `<` only where it
# could open a tag, a comment or an autolink.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]|~&]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|<(?=[A-Za-z/!?])")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\u2028\u2029]+")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a cell as a formula (OWASP's list for CSV injection)."""


def one_line(text: str) -> str:
    """``text`` with every line break made a space: a value never starts a new Markdown block or CSV row."""
    return _LINE_BREAKS.sub(" ", text)


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown inline text: one line, and every character that could start emphasis, code, a
    link, raw HTML, an entity or a table cell backslash-escaped (``small_input`` and ``p<0.002`` stay as they are).

    >>> markdown_text("small_input=True, p<0.002, _x_ *y* [z](u) a|b")
    'small_input=True, p<0.002, \\\\_x\\\\_ \\\\*y\\\\* \\\\[z\\\\](u) a\\\\|b'
    """
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), one_line(text))


def markdown_code(text: str) -> str:
    """``text`` as a Markdown code span, fenced with more backticks than it holds in a row (CommonMark)."""
    text = one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}" if longest else f"`{text}`"


def spreadsheet_text(value: Any) -> Any:
    """A CSV cell value: text that a spreadsheet would run as a formula gets a leading ``'`` (shown as text);
    anything else, numbers included, is returned as it is."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
