"""The page of ``transferkit inspect``: each suspected image beside its evidence, as thumbnails.

Drawn from the inspection's JSON form alone (``Inspection.to_dict()``, which ``inspection.json``
holds), so it needs neither the features nor the model. Thumbnails are small JPEGs in ``thumbs/``
beside the page, each linked to its original file; every image is decoded once, at a reduced size
where the format allows (PIL's JPEG draft mode).
"""

from __future__ import annotations

import hashlib
import html
import io
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from ..data import to_rgb, upright
from ..files import atomic_write
from ..shards import image_bytes, is_packed_image
from .html import CSS

THUMB_PX = 160  # the longer side of a thumbnail
SHOWN = 100  # suspects drawn per section; inspection.json and suspects.txt list them all
THUMBS_DIR = "thumbs"
PAGE_CSS = """
.suspect{display:flex;flex-wrap:wrap;align-items:flex-start;gap:10px;border-top:1px solid #eaeef2;padding:10px 0}
.suspect figure{margin:0;width:164px;font-size:12px;color:#59636e;overflow-wrap:anywhere}
.suspect figure.main{width:180px}.suspect figure.main img{border:3px solid #cf222e}
.suspect figure.keep img{border:3px solid #1a7f37}
.suspect figcaption strong{color:#1f2328}.suspect figcaption strong.clash{color:#cf222e}
.suspect .why{flex-basis:100%;margin:0;font-size:13px}
.neighbours{display:flex;gap:8px;flex-wrap:wrap;padding-left:12px;border-left:2px dashed #d0d7de}
.neighbours figure{width:120px}.clash{color:#cf222e;font-weight:600}.missing{width:150px;height:100px;
background:#f6f8fa;display:flex;align-items:center;justify-content:center;font-size:12px}
"""


class _Thumbnails:
    """Writes each image's thumbnail once into ``folder/thumbs`` and answers its ``<img>`` (or why not)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.made = folder, {}  # type: ignore[var-annotated]

    def img(self, path: str) -> str:
        if path not in self.made:
            self.made[path] = self._make(path)
        name = self.made[path]
        picture = ('<div class="missing">no preview</div>' if name is None else
                   f'<img src="{THUMBS_DIR}/{name}" alt="{html.escape(Path(path).name)}" loading="lazy">')  # fmt: skip
        if is_packed_image(path):  # no file to open: the thumbnail is all there is (its name in the title)
            return f'<span title="{html.escape(path)}">{picture}</span>'
        link = html.escape(Path(path).as_uri() if Path(path).is_absolute() else path)
        return f'<a href="{link}">{picture}</a>'

    def _make(self, path: str) -> str | None:
        name = hashlib.sha1(path.encode()).hexdigest()[:16] + ".jpg"
        try:
            with Image.open(io.BytesIO(image_bytes(path)) if is_packed_image(path) else path) as im:
                im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at 1/2..1/8 scale, much faster
                shown = upright(im)  # as the model saw it
                shown.thumbnail((THUMB_PX, THUMB_PX))
                rgb = to_rgb(shown)  # as training reads it
        except Exception:  # an undecodable image is a finding, listed as such; no preview here
            return None
        (self.folder / THUMBS_DIR).mkdir(exist_ok=True)
        rgb.save(self.folder / THUMBS_DIR / name, format="JPEG", quality=85)
        return name


def write_inspection_page(path: Path, found: dict[str, Any]) -> Path:
    """Write the page for ``found`` (``Inspection.to_dict()``) to ``path``, thumbnails beside it."""
    thumbs = _Thumbnails(path.parent)
    body = "".join(_section(title, key, render, found, thumbs) for title, key, render in SECTIONS)
    page = _page(found, body)
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _e(value: Any) -> str:
    return html.escape(str(value))


def _figure(thumbs: _Thumbnails, path: str, lines: Sequence[str], css: str = "") -> str:
    caption = "<br>".join(lines)
    return f'<figure class="{css}">{thumbs.img(path)}<figcaption>{caption}</figcaption></figure>'


def _name(path: str) -> str:
    return f"<strong>{_e(Path(path).name)}</strong>"


def _neighbours(thumbs: _Thumbnails, neighbours: Sequence[dict[str, Any]], given: str | None = None) -> str:
    figures = []
    for n in neighbours:
        label = f'<span class="clash">{_e(n["label"])}</span>' if given is not None and n["label"] != given else _e(n["label"])
        figures.append(_figure(thumbs, n["path"], [f"{label} · {_e(n['split'])}", f"similarity {n['similarity']:.3f}"]))
    return f'<div class="neighbours">{"".join(figures)}</div>' if figures else ""


def _label_issue(item: dict[str, Any], thumbs: _Thumbnails) -> str:
    main = _figure(thumbs, item["path"], [
        _name(item["path"]), f"{_e(item['split'])} · labelled <strong>{_e(item['given'])}</strong> "
        f"({item['given_probability']:.2f})",
        f'suggested <strong class="clash">{_e(item["suggested"])}</strong> ({item["suggested_probability"]:.2f})'],
        "main")  # fmt: skip
    why = (f'<p class="why">Labelled <strong>{_e(item["given"])}</strong>, but a probe that never saw it gives '
           f'<strong>{_e(item["suggested"])}</strong> {item["suggested_probability"]:.0%}. Its nearest images:</p>')
    return f'<div class="suspect">{why}{main}{_neighbours(thumbs, item["neighbours"], item["given"])}</div>'


def _pair(item: dict[str, Any], thumbs: _Thumbnails) -> str:
    clash = item["label"] != item["match_label"]
    label = (lambda text: f'<span class="clash">{_e(text)}</span>') if clash else _e
    alike = "the same bytes" if item["identical"] else f"similarity {item['similarity']:.3f}"
    why = f'<p class="why">{alike}{" · <span class=clash>labels differ</span>" if clash else ""}</p>'
    drop = _figure(thumbs, item["path"], [_name(item["path"]), f"{_e(item['split'])} · {label(item['label'])}",
                                          "listed in suspects.txt"], "main")  # fmt: skip
    keep = _figure(thumbs, item["match"], [_name(item["match"]), f"{_e(item['match_split'])} · "
                                           f"{label(item['match_label'])}", "kept"], "keep")  # fmt: skip
    return f'<div class="suspect">{why}{drop}{keep}</div>'


def _identical(item: dict[str, Any], thumbs: _Thumbnails) -> str:
    rows = "".join(f"<li><code>{_e(p)}</code> ({_e(s)}){' · kept' if i == 0 else ''}</li>"
                   for i, (p, s) in enumerate(zip(item["paths"], item["splits"])))  # fmt: skip
    first = _figure(thumbs, item["paths"][0], [f"{len(item['paths'])} files"], "main")
    return f'<div class="suspect">{first}<ul>{rows}</ul></div>'


def _outlier(item: dict[str, Any], thumbs: _Thumbnails) -> str:
    main = _figure(thumbs, item["path"], [_name(item["path"]), f"{_e(item['split'])} · {_e(item['label'])}",
                                          f"mean distance {item['score']:.3f}"], "main")  # fmt: skip
    why = '<p class="why">Far from every other image. Its nearest images:</p>'
    return f'<div class="suspect">{why}{main}{_neighbours(thumbs, item["neighbours"])}</div>'


def _undecodable(items: list[dict[str, Any]], found: dict[str, Any], thumbs: _Thumbnails) -> str:
    rows = "".join(f"<tr><td><code>{_e(i['path'])}</code></td><td>{_e(i['reason'])}</td></tr>" for i in items)
    return f"<table><tr><th>file</th><th>why</th></tr>{rows}</table>"


def _intro(key: str, found: dict[str, Any]) -> str:
    s = found["settings"]
    return {
        "label_issues": "Images whose label the rest of the data disagrees with: cleanlab's <code>find_label_issues</code> "
        f"on out-of-fold probabilities of a linear probe ({s.get('folds_used') or s['folds']}-fold cross-validation), "
        "most likely first. The suspect is framed red, its nearest images follow with their labels.",
        "leaks": "Near-duplicates in different splits: a model is then evaluated on images it trained on. "
        f"Pairs with cosine similarity ≥ {s['duplicate_similarity']:.3f}; the copy in the later split is kept.",
        "duplicates": f"Near-duplicates within one split (cosine similarity ≥ {s['duplicate_similarity']:.3f}).",
        "identical_files": "Files with the same bytes (SHA-256).",
        "outliers": f"The {s['outlier_fraction']:.0%} of images farthest from their {s['neighbours']} nearest "
        "neighbours: other kinds of image, or rare but valid ones. Review before dropping.",
        "undecodable": "Files that cannot be read as images; training skips them already.",
    }[key]


def _section(
    title: str, key: str, render: Callable[..., str], found: dict[str, Any], thumbs: _Thumbnails
) -> str:  # fmt: skip
    items = found[key]
    head = f'<section id="{key}"><h2>{_e(title)} ({len(items)})</h2><p>{_intro(key, found)}</p>'
    if not items:
        return f"{head}<p>None found.</p></section>"
    if key == "undecodable":
        return f"{head}{_undecodable(items, found, thumbs)}</section>"
    more = f'<p class="note">{len(items) - SHOWN} more in inspection.json and suspects.txt.</p>' if len(items) > SHOWN else ""
    return head + "".join(render(item, thumbs) for item in items[:SHOWN]) + more + "</section>"


SECTIONS: list[tuple[str, str, Callable[..., str]]] = [
    ("Likely label errors", "label_issues", _label_issue),
    ("Leaks between splits", "leaks", _pair),
    ("Near-duplicates within a split", "duplicates", _pair),
    ("Identical files", "identical_files", _identical),
    ("Outliers", "outliers", _outlier),
    ("Undecodable images", "undecodable", _undecodable),
]


def _page(found: dict[str, Any], body: str) -> str:
    cards = "".join(f'<a class="card" href="#{key}"><div class="label">{_e(title)}</div>'
                    f'<div class="value">{len(found[key])}</div></a>' for title, key, _ in SECTIONS)  # fmt: skip
    t, cache = found["timings"], found["feature_cache"]
    timing = ", ".join(f"{name.replace('_', ' ')} {seconds:.2f} s" for name, seconds in t.items())
    images = ", ".join(f"{n} {split}" for split, n in found["images"].items() if n)
    notes = "".join(f'<p class="note">{_e(note)}</p>' for note in found["notes"])
    out = Path(found.get("out") or ".")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>transferkit inspect: {_e(found["data"])}</title>
<style>{CSS}{PAGE_CSS}</style>
</head>
<body>
<header><h1>Inspection of {_e(Path(found["data"]).name)}</h1>
<p><code>{_e(found["data"])}</code> · {_e(images)} images · {len(found["class_names"])} classes ·
{_e(found["backbone"])} ({_e(found["layer"])} features, {_e(found["precision"])})
{f' · run <code>{_e(found["run"])}</code>' if found.get("run") else ""}</p></header>
<div class="cards">{cards}</div>
{notes}
<p>Every image listed here is also in <code>{_e(out / "suspects.txt")}</code>, after a comment saying why.
Delete the lines of the images you want to keep, then train without the rest:
<code>{_e(found["train_command"])}</code></p>
{body}
<footer>Generated {datetime.now().strftime("%Y-%m-%d %H:%M")} by transferkit inspect · features: {cache.get("misses", 0)}
computed, {cache.get("hits", 0)} from the cache · {_e(timing)}.</footer>
</body>
</html>
"""
