"""HTML pieces shared by the report's sections: escaping, numbers, tables, definition lists, the style."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else escape(value)


def seconds(value: Any) -> str:
    if value is None:
        return "—"
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:.1f} s" if minutes else f"{seconds:.1f} s"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class={'num' if i >= numeric_from else 'txt'}>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def definitions(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def json_html(value: Any) -> str:
    """Any JSON value as nested lists: the advice entry's shape is not fixed, so none is assumed."""
    if isinstance(value, dict):
        return definitions([(str(k).replace("_", " "), json_html(v)) for k, v in value.items()])
    if isinstance(value, list):
        return "<ul>" + "".join(f"<li>{json_html(v)}</li>" for v in value) + "</ul>"
    return number(value)


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1560px;
margin:0 auto;padding:0 24px 40px}
header{border-bottom:1px solid #d0d7de;margin-bottom:8px}h1{margin:16px 0 4px;font-size:26px}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}h3{margin:20px 0 8px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d0d7de;padding:3px 10px}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:600}dd{margin:0}
dd ul,li ul{margin:0;padding-left:18px}
img{max-width:100%;height:auto;border:1px solid #eaeef2}figure{margin:8px 0}
figcaption{color:#59636e;font-size:13px;max-width:900px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px}
.card .label{color:#59636e;font-size:12px}.card .value{font-size:20px;font-weight:600}
.advice{background:#ddf4ff;border-radius:6px;padding:4px 14px}.note{background:#fff8c5;padding:8px 12px}
code{font-size:13px;background:#f6f8fa;padding:1px 4px;border-radius:4px}
footer{margin-top:40px;color:#59636e;font-size:13px}
"""
