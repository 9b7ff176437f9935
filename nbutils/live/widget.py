"""The inline neuron viewer (ipywidgets) and the static HTML export.

The widget only wires controls to the pure renderer in ``nbutils.view.render``: choosing a layer, typing a neuron
index, stepping with next/previous through an order (by index or by score), or filtering by text in the
explanation all end in one call, ``show``, which sets ``html.value`` to ``render.neuron_html(...)``. Below the
controls, three tabs of live calls on the unit shown (`nbutils.live.panels`): try a text, test an explanation,
steer.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbutils.core.errors import UserError
from nbutils.core.io import atomic_write_bytes
from nbutils.core.layout import page_path
from nbutils.core.units import Key
from nbutils.live.interactive import Run
from nbutils.live.panels import LivePanels
from nbutils.view.render import PAGE_UNITS, fragment, neuron_html, page, run_html
from nbutils.view.runview import SORTS, RunView


def as_run(view: RunView | str | Path) -> Run:
    """A run folder, or a `RunView` already open, as a `Run` (the same data, with its live calls)."""
    if isinstance(view, Run):
        return view
    if isinstance(view, RunView):
        return Run(**{f.name: getattr(view, f.name) for f in dataclasses.fields(view)})
    return Run.open(view)


class NeuronViewer:
    """Controls for choosing a neuron, above its rendered view. Display it with ``display(viewer)``."""

    def __init__(
        self, run: RunView | str | Path, layer: int | None = None, neuron: int | None = None, sort: str | None = None
    ) -> None:
        """Open a run; show ``layer``/``neuron``, else the first neuron in ``sort`` order (best score if scored)."""
        import ipywidgets as w

        self.view = as_run(run)
        layers = self.view.store.layers
        self.layer = w.Dropdown(options=layers, description="layer", layout=w.Layout(width="150px"))
        self.neuron = w.BoundedIntText(
            min=0,
            max=self.view.store.meta.neurons_per_layer - 1,
            description=self.view.store.meta.noun,
            layout=w.Layout(width="170px"),
        )
        self.sign = w.ToggleButtons(options=["positive"], description="side", style={"button_width": "80px"})
        self.previous = w.Button(description="\u25c0 previous", layout=w.Layout(width="100px"))
        self.next = w.Button(description="next \u25b6", layout=w.Layout(width="100px"))
        sort = sort or (SORTS[1] if self.view.scores else SORTS[0])
        self.sort = w.Dropdown(options=SORTS, value=sort, description="order", layout=w.Layout(width="230px"))
        self.filter = w.Text(placeholder="text in explanation", description="filter", continuous_update=False)
        self.status = w.HTML()
        self.html = w.HTML()
        self.panels = LivePanels(self.view, self._unit_shown, self.show)
        self.widget = w.VBox(
            [
                w.HBox([self.layer, self.neuron, self.sign]),
                w.HBox([self.previous, self.next, self.sort, self.filter, self.status]),
                self.panels.widget,
                self.html,
            ]
        )
        self._order: list[tuple[int, int]] = []
        self._busy = False
        self._shown: Key | None = None
        for control in (self.layer, self.neuron, self.sign):
            control.observe(lambda _: self._from_controls(), names="value")
        for control in (self.sort, self.filter):
            control.observe(lambda _: self._reorder(), names="value")
        self.next.on_click(lambda _: self.step(1))
        self.previous.on_click(lambda _: self.step(-1))
        self._reorder(show_first=False)
        first = self._order[0] if self._order else (layers[0], int(self.view.store.neurons(layers[0])[0]))
        if layer is not None and neuron is None:  # the first neuron of that layer in the chosen order
            first = next((i for i in self._order if i[0] == layer), (layer, int(self.view.store.neurons(layer)[0])))
        self.show(first[0] if layer is None else layer, first[1] if neuron is None else neuron)

    @property
    def current(self) -> Key:
        """(layer, neuron, sign) shown now."""
        return (int(self.layer.value), int(self.neuron.value), str(self.sign.value))

    def show(self, layer: int, neuron: int, sign: str | None = None) -> None:
        """Show a neuron: set the controls and render its view (an error message if it was not collected)."""
        if layer not in self.view.store.layers:
            self.html.value = fragment(f"<p>Layer {layer} was not collected; layers: {self.view.store.layers}.</p>")
            return
        self._busy = True
        try:
            self.layer.value = layer
            self.neuron.value = neuron
            signs = self.view.signs(layer, neuron)
            self.sign.options = signs
            self.sign.value = sign if sign in signs else signs[0]
        finally:
            self._busy = False
        self._render()

    def _unit_shown(self) -> Key:
        """The unit on screen, for the live tabs; none while a filter matches no unit."""
        if self._shown is None:
            raise UserError("No unit is shown: the filter matches none.", "Change or clear the filter first.")
        return self._shown

    def step(self, by: int) -> None:
        """Move ``by`` places through the current order (wrapping around)."""
        if not self._order:
            return
        here = (int(self.layer.value), int(self.neuron.value))
        i = self._order.index(here) if here in self._order else (-1 if by > 0 else 0)
        self.show(*self._order[(i + by) % len(self._order)])

    def _from_controls(self) -> None:
        if not self._busy:
            self.show(int(self.layer.value), int(self.neuron.value), str(self.sign.value))

    def _reorder(self, show_first: bool = True) -> None:
        self._order = self.view.neuron_ids(self.sort.value, self.filter.value.strip())
        noun = self.view.store.meta.noun
        self.status.value = f"<span style='color:#777'>{len(self._order):,} {noun}s in this order</span>"
        if show_first and self._order:
            self.show(*self._order[0])
        elif show_first:  # nothing matches: no unit is shown, rather than the last one under a filter it fails
            self.html.value = fragment(
                f"<p>No {noun} matches the filter {html.escape(repr(self.filter.value.strip()))}: change or clear it "
                f"to see {noun}s again.</p>"
            )
            self.panels.clear()
            self._shown = None

    def _render(self) -> None:
        layer, neuron, sign = self.current
        if self._shown != (layer, neuron, sign):  # another unit: the live tabs held the last one's results
            self.panels.clear()
            self._shown = (layer, neuron, sign)
        try:
            self.html.value = fragment(neuron_html(self.view, layer, neuron, sign))
        except UserError as e:
            self.html.value = fragment(f"<p><b>{html.escape(e.problem)}</b> {html.escape(e.fix)}</p>")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def export_html(
    run: RunView | str | Path,
    path: str | Path,
    neurons: Sequence[Sequence[Any]] | None = None,
    page_units: int = PAGE_UNITS,
) -> Path:
    """Write a self-contained HTML page (no kernel, no network) for some neurons or a whole run.

    ``neurons``: [(layer, neuron)] or [(layer, neuron, sign)]; None means the run's explained neurons.
    ``page_units``: how many of them the page shows in full (`nbutils.view.render.page_choice`); its table
    lists them all.
    """
    view = run if isinstance(run, RunView) else RunView.open(run)
    if neurons is not None and len(neurons) == 1:
        layer, neuron, *rest = neurons[0]
        body = neuron_html(view, int(layer), int(neuron), rest[0] if rest else "positive")
        text = page(f"Layer {layer}, neuron {neuron}", body)
    else:
        keys = (
            None if neurons is None else [(int(n[0]), int(n[1]), n[2] if len(n) > 2 else "positive") for n in neurons]
        )
        text = run_html(view, keys, page_units)
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def write_page(view: RunView, inspect_dir: str | Path, page_units: int = PAGE_UNITS) -> Path:
    """The static page of a run's explained units, where a stage-04 folder keeps it (``page_units`` of them in
    full, all in its table)."""
    return export_html(view, page_path(inspect_dir), page_units=page_units)
