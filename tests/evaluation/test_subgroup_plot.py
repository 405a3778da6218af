"""subgroups.png: the legend names exactly the groups drawn, and lies outside every panel's plotted area.

The drawn groups are read back from the axes' artists (each marker's AUC and each interval's ends identify the
group this test gave them), not from the list the plotting code used.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from matplotlib.colors import to_hex

from hmn.evaluation.subgroups import _subgroups_figure, plot_subgroups

GROUPS = {"sex": ["F", "M"], "age_band": ["0-19", "20-39", "40-59", "60-79", "80+"], "view": ["AP", "LATERAL", "PA"]}


def _subgroups(n_classes: int, attributes=("sex", "age_band", "view")):
    """A subgroup report in :func:`subgroup_report`'s shape with a distinct AUC and interval per (group, finding).

    The 0-19 band has no AUC for the first finding (when there are several), and 60-79 has none at all (drawn
    nowhere). Returns the report, the class names and ``{(attribute, auc or interval): (group, class)}``.
    """
    classes = [f"Finding {c}" for c in range(n_classes)]
    rows, owner = [], {}
    value = itertools.count()
    for attribute in attributes:
        for g in GROUPS[attribute]:
            for c, name in enumerate(classes):
                undefined = g == "60-79" or (g == "0-19" and c == 0 and n_classes > 1)
                auc = None if undefined else round(0.55 + 0.002 * next(value), 4)
                ci = None if auc is None else [round(auc - 0.05, 4), round(auc + 0.04, 4)]
                rows.append({"attribute": attribute, "group": g, "class": name, "auc": auc, "auc_ci": ci})
                if auc is not None:
                    owner[(attribute, auc)] = (g, name)
                    owner[(attribute, tuple(ci))] = (g, name)
    return {"attributes": list(attributes), "rows": rows}, classes, owner


def _drawn_groups(ax, attribute, classes, owner):
    """``{group: colour}`` of the markers and intervals drawn in `ax`, identified by their values."""
    colours: dict[str, set[str]] = {}
    k = len(classes)
    for line in ax.lines:
        x = [round(float(v), 4) for v in line.get_xdata()]
        if line.get_linestyle() == ":":  # the chance line at 0.5
            continue
        key = (attribute, x[0]) if len(x) == 1 else (attribute, tuple(x))
        group, name = owner[key]  # a KeyError: something drawn that is neither an AUC nor an interval
        row = k - 1 - classes.index(name)
        assert all(row - 0.5 < y < row + 0.5 for y in line.get_ydata()), (group, name, line.get_ydata())
        colours.setdefault(group, set()).add(to_hex(line.get_color()))
    for group, c in colours.items():
        assert len(c) == 1, f"{group} drawn in several colours {c}"
    return {g: next(iter(c)) for g, c in colours.items()}


def _figure_box(artist, fig, renderer):
    return artist.get_window_extent(renderer).transformed(fig.transFigure.inverted())


@pytest.mark.parametrize("n_classes", [1, 3, 14])
def test_legend_names_each_drawn_group_once_and_covers_no_interval(n_classes):
    sub, classes, owner = _subgroups(n_classes)
    fig = _subgroups_figure(sub, classes)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.axes) == len(sub["attributes"])
    for ax, attribute in zip(fig.axes, sub["attributes"]):
        drawn = _drawn_groups(ax, attribute, classes, owner)
        expected = set(GROUPS[attribute]) - {"60-79"}  # 60-79 has no AUC anywhere: nothing drawn
        assert set(drawn) == expected  # the test's data are all drawn (0-19 included)
        assert len(set(drawn.values())) == len(drawn)  # one colour per group
        legend = ax.get_legend()
        texts = [t.get_text() for t in legend.get_texts()]
        assert sorted(texts) == sorted(drawn) and len(texts) == len(set(texts))  # exactly one entry per drawn group
        handles = dict(zip(texts, (to_hex(h.get_color()) for h in legend.legend_handles)))
        assert handles == drawn  # each entry in its group's colour

        box = _figure_box(legend, fig, renderer)
        # inside the figure (a legend cut off at the edge loses entries in the PNG)
        assert 0 <= box.x0 and box.x1 <= 1 and 0 <= box.y0 and box.y1 <= 1, (attribute, box)
        # outside every panel's data area, where the intervals are drawn, and clear of the axis texts
        for other in fig.axes:
            assert not box.overlaps(other.get_position()), (attribute, box, other.get_position())
        for text in [ax.xaxis.label, ax.title, *ax.get_xticklabels()]:
            assert not box.overlaps(_figure_box(text, fig, renderer)), (attribute, text.get_text())


def test_plot_subgroups_still_writes_the_png(tmp_path):
    sub, classes, _ = _subgroups(2, attributes=("age_band",))
    path = plot_subgroups(sub, classes, tmp_path / "subgroups.png")
    data = (tmp_path / "subgroups.png").read_bytes()
    assert str(path) == str(tmp_path / "subgroups.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    fig = _subgroups_figure(sub, classes)
    assert all(abs(px - v * fig.dpi) < 1 for px, v in zip((width, height), fig.get_size_inches()))
