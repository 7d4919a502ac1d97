"""One line under the chat: the model, its devices, how full the context is, the last speed."""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget


class StatusBar(Widget):
    """Shows what the engine reported last. `activity` is what is going on now (loading progress,
    "generating…", a load failure), empty when idle."""

    model: reactive[str] = reactive("no model")
    devices: reactive[str] = reactive("")
    context_used: reactive[int | None] = reactive(None)
    context_limit: reactive[int | None] = reactive(None)
    tokens_per_s: reactive[float | None] = reactive(None)
    persona: reactive[str] = reactive("")
    activity: reactive[str] = reactive("")

    def render(self) -> Content:
        parts = [self.model]
        if self.devices:
            parts.append(self.devices)
        if self.context_limit:
            used = "?" if self.context_used is None else f"{self.context_used:,}"
            parts.append(f"context {used}/{self.context_limit:,}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.persona:
            parts.append(f"persona {self.persona}")
        if self.activity:
            parts.append(self.activity)
        return Content(" │ ".join(parts))  # plain text: a model name may hold "[" (not markup)
