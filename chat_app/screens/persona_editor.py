"""A form to create or edit a persona: name, system prompt and sampling settings."""

from __future__ import annotations

import dataclasses

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from chat_app.personas import SETTING_RULES, Persona, PersonaError, PersonaLibrary

NEW_PERSONA = Persona(name="New persona", system_prompt="")


class PersonaEditorScreen(ModalScreen[Persona | None]):
    """Saves into the library and is dismissed with the saved persona, or None on cancel.

    Nothing is saved until every field is valid; what is wrong is shown under the form and the form
    keeps what was typed. Saving a built-in writes the user's copy that overrides it; saving a user
    persona under a new name renames it (the old file goes once the new one is written); a name that
    another persona has is refused, so no persona is overwritten by accident."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="persona_editor.save"),
        Binding("escape", "cancel", "Cancel", id="persona_editor.cancel"),
    ]

    def __init__(self, library: PersonaLibrary, persona: Persona | None) -> None:
        super().__init__()
        self.library = library
        self.original = persona
        self.persona = persona or NEW_PERSONA

    def compose(self) -> ComposeResult:
        persona = self.persona
        heading = "New persona" if self.original is None else f"Edit persona {persona.name}"
        with Vertical(classes="dialog wide"):
            yield Label(heading, classes="question", markup=False)
            yield Label("Name")
            yield Input(persona.name, id="name")
            yield Label("System prompt")
            yield TextArea(persona.system_prompt, id="system_prompt", soft_wrap=True)
            with Grid(id="settings"):
                for setting in SETTING_RULES:
                    yield Label(setting)
                    yield Input(str(getattr(persona, setting)), id=setting, tooltip=SETTING_RULES[setting][2])
            yield Label("", classes="error", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save (ctrl+s)", id="save", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def action_save(self) -> None:
        try:
            persona = self._persona_from_form()
            renamed = self.original is None or self.original.name.casefold() != persona.name.casefold()
            if renamed and persona.name.casefold() in {p.name.casefold() for p in self.library.list()}:
                raise PersonaError(f"a persona named {persona.name!r} already exists; choose another name")
            self.library.save(persona)
            if renamed and self.original is not None and not self.original.builtin:
                self.library.delete(self.original.name)
        except PersonaError as error:
            self.query_one(".error", Label).update(str(error))
            return
        self.dismiss(persona)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _persona_from_form(self) -> Persona:
        settings = {}
        for setting, (kind, _, rule_in_words) in SETTING_RULES.items():
            text = self.query_one(f"#{setting}", Input).value.strip()
            try:
                settings[setting] = kind(text)
            except ValueError:
                raise PersonaError(f"{setting} must be {rule_in_words}, got {text!r}") from None
        return dataclasses.replace(
            NEW_PERSONA,
            name=self.query_one("#name", Input).value.strip(),
            system_prompt=self.query_one("#system_prompt", TextArea).text,
            **settings,
        )
