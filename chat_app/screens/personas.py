"""Choose the conversation's persona, and manage the persona library (new, edit, delete, import,
export)."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Label, OptionList
from textual.widgets.option_list import Option

from chat_app.personas import Persona, PersonaError, PersonaLibrary
from chat_app.screens.confirm import ConfirmScreen
from chat_app.screens.persona_editor import PersonaEditorScreen
from chat_app.screens.text_prompt import TextPromptScreen


PROMPT_PREVIEW = 80  # characters of the system prompt shown in the list


class PersonaScreen(ModalScreen[Persona | None]):
    """Dismissed with the persona chosen (Enter, a click, or Use), or None (Esc)."""

    BINDINGS = [
        Binding("escape", "close", "Close", id="personas.close"),
        Binding("n", "new", "New", id="personas.new"),
        Binding("e", "edit", "Edit", id="personas.edit"),
        Binding("d,delete", "delete", "Delete", id="personas.delete"),
        Binding("i", "import", "Import", id="personas.import"),
        Binding("x", "export", "Export", id="personas.export"),
    ]

    def __init__(self, library: PersonaLibrary, current_name: str) -> None:
        super().__init__()
        self.library = library
        self.current_name = current_name
        self.personas: list[Persona] = []  # parallel to the list's options

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Personas: Enter uses the highlighted one for this conversation", classes="question")
            yield OptionList(id="persona-list", markup=False)
            yield Label("", classes="error", markup=False)
            with Horizontal(classes="buttons"):
                for label, action in (("Use", "use"), ("New (n)", "new"), ("Edit (e)", "edit"),
                                      ("Delete (d)", "delete"), ("Import (i)", "import"),
                                      ("Export (x)", "export"), ("Close", "close")):
                    yield Button(label, id=action, compact=True)

    def on_mount(self) -> None:
        self.refresh_list(self.current_name)

    def refresh_list(self, highlight_name: str) -> None:
        """Re-reads the library (its files may have changed) and highlights `highlight_name`."""
        self.personas = self.library.list()
        option_list = self.query_one("#persona-list", OptionList)
        option_list.set_options(Option(self._describe(persona)) for persona in self.personas)
        names = [persona.name.casefold() for persona in self.personas]
        if highlight_name.casefold() in names:
            option_list.highlighted = names.index(highlight_name.casefold())
        option_list.focus()
        self._show_error("\n".join(self.library.problems))

    def _describe(self, persona: Persona) -> Content:
        current = "✓ " if persona.name.casefold() == self.current_name.casefold() else "  "
        kind = " (built-in)" if persona.builtin else ""
        first_line = persona.system_prompt.strip().split("\n", 1)[0]
        if len(first_line) > PROMPT_PREVIEW:
            first_line = first_line[: PROMPT_PREVIEW - 1] + "…"
        settings = f"temperature {persona.temperature} · top_p {persona.top_p} · top_k {persona.top_k}"
        return (
            Content(current)
            + Content.styled(persona.name + kind, "bold")
            + Content.styled(f"\n  {first_line}\n  {settings} · max {persona.max_new_tokens} tokens", "dim")
        )

    @property
    def highlighted(self) -> Persona | None:
        index = self.query_one("#persona-list", OptionList).highlighted
        return None if index is None else self.personas[index]

    def _show_error(self, message: str) -> None:
        self.query_one(".error", Label).update(message)

    @on(OptionList.OptionSelected)
    def _chosen(self) -> None:
        self.action_use()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.run_action(event.button.id)

    def action_use(self) -> None:
        if self.highlighted is not None:
            self.dismiss(self.highlighted)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_new(self) -> None:
        self.app.push_screen(PersonaEditorScreen(self.library, None), self._edited)

    def action_edit(self) -> None:
        if self.highlighted is not None:
            self.app.push_screen(PersonaEditorScreen(self.library, self.highlighted), self._edited)

    def _edited(self, persona: Persona | None) -> None:
        if persona is not None:
            self.refresh_list(persona.name)

    def action_delete(self) -> None:
        persona = self.highlighted
        if persona is None:
            return
        if persona.builtin:
            self._show_error(f"{persona.name} is built in and cannot be deleted (edit it to make your own copy)")
            return
        question = f"Delete the persona {persona.name!r}? Conversations had with it keep their copy."

        def delete(confirmed: bool | None) -> None:
            if not confirmed:
                return
            try:
                self.library.delete(persona.name)
            except PersonaError as error:
                self._show_error(str(error))
                return
            self.refresh_list(self.current_name)

        self.app.push_screen(ConfirmScreen(question, "Delete"), delete)

    def action_import(self) -> None:
        def accept(text: str) -> str | None:
            try:
                imported = self.library.import_toml(Path(text).expanduser())
            except PersonaError as error:
                return str(error)
            self.refresh_list(imported.name)
            return None

        self.app.push_screen(TextPromptScreen("Import a persona from the TOML file:", "", accept))

    def action_export(self) -> None:
        persona = self.highlighted
        if persona is None:
            return

        def accept(text: str) -> str | None:
            try:
                path = self.library.export_toml(persona.name, Path(text).expanduser())
            except PersonaError as error:
                return str(error)
            self.notify(f"Persona {persona.name} exported to {path}")
            return None

        default = str(Path.cwd() / f"{persona.name}.toml")
        self.app.push_screen(TextPromptScreen(f"Export {persona.name} to the file:", default, accept))
