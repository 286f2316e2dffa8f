"""Charts as server-rendered SVG from pygal (a charting library installed as a dependency): no
JavaScript, nothing fetched from the network, readable by every browser and screenshot tool.

pygal writes an inline ``<script>`` into every chart (its tooltip script's configuration) even when no
tooltip script is loaded; the pages' Content-Security-Policy allows scripts from this server only, so the
browser would block it and log an error for each chart. The script is taken out of the drawing, and each
point's label becomes an SVG ``<title>``: the browser's own hover text, no script needed.

pygal draws with floats. The figures are converted only to place points on the drawing; every number a
person reads (tooltips, tables, cards) is formatted from the exact ``Decimal``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import pygal
from pygal.style import Style

from meterline.dashboard.formatting import amount, currency_symbol

# pygal appends a legacy import hook (for its map plug-ins, unused here) to ``sys.meta_path``; Python
# then warns (ImportWarning) on every later import that reaches it, which breaks programs that treat
# warnings as errors. It is taken out again.
sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != "PluginImportFixer"]

# The usage chart's lines (seed 002: web usage and CLI usage); any other source is summed into "Other".
SOURCE_LINES = (("web", "Web"), ("cli", "CLI"))
OTHER = "Other"

_STYLE = Style(
    background="transparent",
    plot_background="transparent",
    foreground="#1f2937",
    foreground_strong="#111827",
    foreground_subtle="#9ca3af",
    opacity=".15",
    opacity_hover=".3",
    colors=("#4f46e5", "#0d9488", "#d97706", "#db2777", "#2563eb", "#65a30d", "#7c3aed", "#dc2626"),
    font_family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
    label_font_size=13,
    major_label_font_size=13,
    legend_font_size=14,
    value_font_size=12,
    tooltip_font_size=13,
    stroke_width=3,
    guide_stroke_color="#e5e7eb",
    major_guide_stroke_color="#e5e7eb",
    guide_stroke_dasharray="0",
    major_guide_stroke_dasharray="0",
)
# Bars are solid; lines keep the light fill under them.
_BAR_STYLE = Style(**{**_STYLE.to_dict(), "opacity": ".85", "opacity_hover": "1"})
# No pygal.js: it would be loaded from the network. Hover text comes from ``<title>`` (``_strict_svg``).
_COMMON: dict[str, Any] = {
    "style": _STYLE,
    "js": [],
    "disable_xml_declaration": True,
    "show_y_guides": True,
    "show_x_guides": False,
    "legend_at_bottom": True,
    "legend_box_size": 14,
    "margin": 8,
    "no_data_text": "No usage in this range yet",
}


def bucket_label(start: datetime, granularity: str) -> str:
    """What the x axis says for a bucket: 14:00 (hourly), Mar 12 (daily), from Mar 5 (weekly)."""
    if granularity == "hour":
        return start.strftime("%H:%M")
    return start.strftime("%b %-d")


def _drawn(value: Decimal) -> float:
    return float(value)  # drawing only; see the module docstring


def usage_lines(buckets: Sequence[Mapping[str, Any]]) -> dict[str, list[Decimal]]:
    """The chart's series from a ``/v1/usage/timeseries?by=source`` body's ``data``: Web, CLI and, when
    any other source used something, Other."""
    lines: dict[str, list[Decimal]] = {title: [] for _, title in SOURCE_LINES}
    other: list[Decimal] = []
    for bucket in buckets:
        values = {name: Decimal(v) for name, v in bucket["values"].items()}
        for source, title in SOURCE_LINES:
            lines[title].append(values.pop(source, Decimal(0)))
        other.append(sum(values.values(), Decimal(0)))
    if any(other):
        lines[OTHER] = other
    return lines


def line_chart(
    lines: Mapping[str, Sequence[Decimal]], labels: Sequence[str], unit: str, title: str, *, width: int = 900
) -> str:
    """The usage chart. ``width`` is the drawing's own width: the page scales it to fit, so a narrow
    drawing (phones) keeps its text readable."""
    narrow = width < 600
    chart = pygal.Line(
        **_COMMON,
        height=300 if narrow else 320,
        width=width,
        dots_size=2 if narrow else 3,
        show_minor_x_labels=len(labels) <= (4 if narrow else 12),
        x_labels_major_count=4 if narrow else 8,
        truncate_label=-1,
        fill=False,
        max_scale=6,
        margin_right=28,  # room for the last x label, which pygal centres on the plot's edge
    )
    chart.x_labels = list(labels)
    chart.value_formatter = lambda value: axis_label(value, unit)
    for name, values in lines.items():
        chart.add(
            name,
            [
                {"value": _drawn(v), "label": f"{name}, {labels[i]}: {amount(v, unit)}"}
                for i, v in enumerate(values)
            ],
        )
    return _svg(chart, title)


def bar_chart(rows: Sequence[tuple[str, Decimal]], unit: str, title: str) -> str:
    """Horizontal bars, one per name, biggest on top (usage by model)."""
    chart = pygal.HorizontalBar(
        **{
            **_COMMON,
            "style": _BAR_STYLE,
            "show_legend": False,
            "show_y_guides": False,
            "show_x_guides": True,
        },
        height=max(160, 34 * len(rows) + 70),
        width=560,
        max_scale=5,
        print_values=False,
        truncate_label=-1,
    )
    ordered = list(reversed(rows))  # pygal draws the first bar at the bottom
    chart.x_labels = [name if len(name) <= 28 else name[:27] + "…" for name, _ in ordered]
    chart.value_formatter = lambda value: axis_label(value, unit)
    chart.add(
        "credits" if unit == "credits" else unit,
        [{"value": _drawn(value), "label": f"{name}: {amount(value, unit)}"} for name, value in ordered],
    )
    return _svg(chart, title)


def axis_label(value: float | None, unit: str) -> str:
    """An axis tick: pygal picks round ticks (0.02, 0.5, 30), shown as such, with the currency symbol."""
    if value is None:
        return ""
    number = Decimal(repr(value)).normalize()
    text = f"{number:,f}"
    return text if unit == "credits" else f"{currency_symbol(unit)}{text}"


def _strict_svg(root: Any) -> Any:
    """The drawing without pygal's inline scripts, each point titled with its label (hover text)."""
    for element in list(root.iter()):
        for child in list(element):
            if child.tag == "script":
                element.remove(child)
            elif child.tag == "desc" and child.get("class") == "label" and child.text:
                hover = element.makeelement("title", {})
                hover.text = child.text
                element.insert(0, hover)
    return root


def _svg(chart: Any, title: str) -> str:
    chart.add_xml_filter(_strict_svg)
    svg: str = chart.render(is_unicode=True)
    # An accessible name for the drawing; the exact figures are in the table next to it.
    return svg.replace("<svg ", f'<svg role="img" aria-label="{_attr(title)}" ', 1)


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
