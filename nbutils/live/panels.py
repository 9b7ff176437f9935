"""The viewer's live panels on the unit it shows (ipywidgets): *Try a text* (this unit's heatmap on a text
you type, and the run's units that fire most on it, each a button that opens that unit), *Test an
explanation* (yours scored now beside the stored explanation's and the baseline's, true against simulated),
and *Steer* (a prompt continued with and without the unit shifted).

Each panel only calls the run's live API (`nbutils.live.interactive`) and shows the result's HTML. A call
that takes a while says so in the panel first; a problem is shown as its message and fix, never as a
traceback in the widget.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from nbutils.core.errors import UserError
from nbutils.core.units import Key
from nbutils.live.interactive import Run
from nbutils.view.render import fragment

BUSY = "<p class='nbx-muted'>{what} (the first call loads the models; this can take a while) ...</p>"
SCORE_HINT = (
    "<p class='nbx-muted'>The simulation score first (seconds to minutes); tick the box for detection and fuzzing "
    "too (the run's other scorers: several times the requests)</p>"
)
STEER_HINT = (
    "<p class='nbx-muted'>Ticked: the shift the intervention score uses (a target KL on the prompt). "
    "Unticked: strength x the unit's largest value (0: no shift)</p>"
)


def _message(problem: str, fix: str = "") -> str:
    return fragment(f"<p><b>{html.escape(problem)}</b> {html.escape(fix)}</p>")


class LivePanels:
    """Three tabs of live calls on the unit ``current()`` returns; ``open_unit(layer, index)`` shows
    another unit in the viewer (a top unit's button)."""

    def __init__(self, run: Run, current: Callable[[], Key], open_unit: Callable[[int, int], None]) -> None:
        import ipywidgets as w

        self.run, self.current, self.open_unit = run, current, open_unit
        wide = w.Layout(width="70%")
        self.text = w.Textarea(placeholder="a sentence of your own", layout=wide)
        self.show_text = w.Button(description="show", button_style="primary")
        self.text_out = w.HTML()
        self.top_units = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        # the box's value reaches the kernel when it loses focus (a click on *score*), not keystroke by keystroke:
        # a click handled between two keystrokes' updates would score a prefix of what the box shows
        self.explanation = w.Text(placeholder="your explanation of this unit", layout=wide, continuous_update=False)
        self.score = w.Button(description="score", button_style="primary")
        self.every_scorer = w.Checkbox(value=False, description="every scorer of the run (slower)", indent=False)
        self.score_out = w.HTML(SCORE_HINT)
        self.prompt = w.Text(value="I went to the", description="prompt", layout=wide)
        self.by_kl = w.Checkbox(value=True, description="the intervention score's shift", indent=False)
        self.strength = w.FloatText(value=1.0, description="strength", layout=w.Layout(width="220px"), disabled=True)
        self.by_kl.observe(lambda change: setattr(self.strength, "disabled", change["new"]), names="value")
        self.steer = w.Button(description="steer", button_style="primary")
        self.steer_out = w.HTML(STEER_HINT)
        self.widget = w.Tab(
            children=[
                w.VBox([w.HBox([self.text, self.show_text]), self.text_out, self.top_units]),
                w.VBox([w.HBox([self.explanation, self.score, self.every_scorer]), self.score_out]),
                w.VBox([w.HBox([self.prompt, self.by_kl, self.strength, self.steer]), self.steer_out]),
            ]
        )
        for i, title in enumerate(("Try a text", "Test an explanation", "Steer")):
            self.widget.set_title(i, title)
        self.show_text.on_click(lambda _: self.try_text())
        self.score.on_click(lambda _: self.test_explanation())
        self.steer.on_click(lambda _: self.steer_unit())

    def _unit(self) -> Any:
        layer, index, sign = self.current()
        return self.run.unit(layer, index, sign)

    def _call(self, out: Any, what: str, work: Callable[[], str]) -> bool:
        """Show ``what`` is under way, then the HTML ``work`` returns, or its problem as a message."""
        out.value = fragment(BUSY.format(what=html.escape(what)))
        try:
            out.value = fragment(work())
            return True
        except UserError as e:
            out.value = _message(e.problem, e.fix)
        except Exception as e:  # noqa: BLE001 - shown in the panel, where a traceback would be lost
            out.value = _message(f"{what} failed: {type(e).__name__}: {e}", "See the kernel's log for the details.")
        return False

    def try_text(self) -> None:
        """This unit on the typed text, and the run's top units on it (buttons that open them)."""
        import ipywidgets as w

        found: dict[str, Any] = {}

        def work() -> str:
            found["acts"] = self._unit().activations(self.text.value)
            found["top"] = self.run.top_units(self.text.value, k=10)
            return (
                found["acts"]._repr_html_()
                + "<h4>The run's units that fire most on it</h4>"
                + found["top"]._repr_html_()
            )

        self.top_units.children = ()
        if self._call(self.text_out, "Running the subject model", work):
            buttons = []
            for row in found["top"].rows:
                b = w.Button(description=f"L{row['layer']} N{row['unit']}", tooltip=str(row["explanation"] or ""),
                             layout=w.Layout(width="auto"))  # fmt: skip
                b.on_click(lambda _, r=row: self.open_unit(int(r["layer"]), int(r["unit"])))
                buttons.append(b)
            self.top_units.children = tuple(buttons)

    def clear(self) -> None:
        """Empty every tab's results (the viewer shows another unit, or none): never one unit's results
        under another's name."""
        self.text_out.value, self.score_out.value, self.steer_out.value = "", SCORE_HINT, STEER_HINT
        self.top_units.children = ()

    def test_explanation(self) -> None:
        """The typed explanation scored now (as stage 03 scores) beside the stored one and the baseline: the
        simulation score alone unless *every scorer* is ticked. The panel names the text it scores."""
        text = self.explanation.value
        names = None if self.every_scorer.value else self._first_scorers()
        what = (
            f"Simulating and scoring \u201c{text.strip()[:200]}\u201d" if text.strip() else "Scoring"
        )  # escaped there
        # the result's heading names the unit and the text scored
        self._call(self.score_out, what, lambda: self._unit().score(text, names)._repr_html_())

    def _first_scorers(self) -> list[str] | None:
        """The simulation scorer alone when the run has it and others (the fast first answer), else all."""
        names = [sc.name for sc in self.run.scorers_live]
        return ["simulation"] if "simulation" in names and len(names) > 1 else None

    def steer_unit(self) -> None:
        """The prompt continued with and without this unit shifted."""
        strength = None if self.by_kl.value else float(self.strength.value)  # 0 is no shift, not the default
        self._call(self.steer_out, "Steering", lambda: self._unit().steer(self.prompt.value, strength)._repr_html_())


__all__ = ["LivePanels"]
