"""Plotly figures for the run pages. Every trace's hover shows its metric's estimator and
direction from the API's catalogue (`kl` means different things in different libraries)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

Series = Mapping[str, tuple[Sequence[int], Sequence[float | None]]]
Catalogue = Mapping[str, Mapping[str, Any]]


def _hover(name: str, catalogue: Catalogue) -> str:
    info = catalogue.get(name, {})
    lines = [f"<b>{name}</b>", "step %{x}", "value %{y:.4g}"]
    if info:
        lines += [f"estimator: {info['estimator']}", f"direction: {info['direction']}"]
    return "<br>".join(lines) + "<extra></extra>"


def lines(
    series: Series,
    names: Sequence[str],
    catalogue: Catalogue,
    *,
    title: str,
    y_title: str,
    secondary: Sequence[str] = (),
) -> go.Figure:
    """One line per metric present in `series`; `secondary` ones dashed."""
    fig = go.Figure()
    for name in names:
        if name not in series:
            continue
        steps, values = series[name]
        fig.add_trace(
            go.Scatter(
                x=list(steps),
                y=list(values),
                name=name,
                mode="lines+markers" if len(steps) < 60 else "lines",
                line={"dash": "dot"} if name in secondary else {},
                hovertemplate=_hover(name, catalogue),
            )
        )
    fig.update_layout(
        title=title or None,
        xaxis_title="optimizer step",
        yaxis_title=y_title,
        height=340,
        margin={"l": 40, "r": 20, "t": 50 if title else 20, "b": 40},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def kl_budget(
    series: Series,
    names: Sequence[str],
    catalogue: Catalogue,
    *,
    budget: float | None,
    exhaustion: tuple[int | None, bool],
) -> go.Figure:
    fig = lines(series, names, catalogue, title="", y_title="KL", secondary=names[1:])
    if budget is not None:
        fig.add_hline(y=budget, line_dash="dash", line_color="crimson", annotation_text="budget")
        if names and names[0] in series:  # the burn-down: what is left of the budget
            steps, values = series[names[0]]
            fig.add_trace(
                go.Scatter(
                    x=list(steps),
                    y=[None if v is None else budget - v for v in values],
                    name="budget left",
                    mode="lines",
                    line={"color": "crimson", "width": 1},
                    fill="tozeroy",
                    fillcolor="rgba(220,20,60,0.08)",
                    hovertemplate=f"<b>budget left</b> ({names[0]})<br>step %{{x}}<br>"
                    "%{y:.4g}<extra></extra>",
                )
            )
    step, reached = exhaustion
    last = max(
        (s for steps, _ in (series[n] for n in names if n in series) for s in steps), default=0
    )
    # a projection past the data would stretch the x-axis until the real points fill a sliver
    # of the chart: the caption under it says where it lands instead
    if step is not None and (reached or step <= last):
        label = "budget reached" if reached else "budget exhausted at this rate"
        fig.add_vline(x=step, line_dash="dot", line_color="crimson", annotation_text=label)
    return fig


def entropy(
    series: Series,
    names: Sequence[str],
    catalogue: Catalogue,
    *,
    collapse: int | None,
    healthy: int | None,
) -> go.Figure:
    fig = lines(series, names, catalogue, title="", y_title="entropy (nats)")
    if collapse is not None:
        fig.add_vline(
            x=collapse, line_dash="dash", line_color="crimson", annotation_text="collapse"
        )
    if healthy is not None:
        fig.add_vline(
            x=healthy, line_dash="dot", line_color="seagreen", annotation_text="last healthy ckpt"
        )
    return fig


def pareto(rows: Sequence[Mapping[str, Any]], front: Sequence[int]) -> go.Figure:
    """Accuracy against KL spent, one marker per run; the Pareto front joined by a line."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r["kl_spent"] for r in rows],
            y=[r["final_accuracy"] for r in rows],
            text=[r["name"] for r in rows],
            mode="markers",
            name="runs",
            marker={"size": 10, "color": "steelblue"},
            hovertemplate="<b>%{text}</b><br>KL spent %{x:.4g}<br>accuracy %{y:.3f}<extra></extra>",
        )
    )
    if front:
        fig.add_trace(
            go.Scatter(
                x=[rows[i]["kl_spent"] for i in front],
                y=[rows[i]["final_accuracy"] for i in front],
                mode="lines+markers",
                name="Pareto front",
                marker={"size": 13, "color": "crimson", "symbol": "diamond"},
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title="Accuracy vs KL spent",
        xaxis_title="KL spent (kl/exact_batch)",
        yaxis_title="final accuracy (acc/eval)",
        height=380,
    )
    return fig


def rounds(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """A pipeline's runs side by side: accuracy bars and KL spent, per round and role."""
    fig = go.Figure()
    labels = [f"r{r['round']} {r['role']}: {r['run']}" for r in rows]  # two teachers, two bars
    fig.add_trace(
        go.Bar(x=labels, y=[r["accuracy"] for r in rows], name="acc/eval (greedy)", yaxis="y")
    )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=[r["kl"] for r in rows],
            name="KL spent",
            yaxis="y2",
            mode="markers",
            marker={"size": 12, "color": "crimson"},
        )
    )
    fig.update_layout(
        title="Base -> teachers -> student, per round",
        yaxis={"title": "greedy held-out accuracy (acc/eval)"},
        yaxis2={"title": "KL spent", "overlaying": "y", "side": "right"},
        height=380,
    )
    return fig
