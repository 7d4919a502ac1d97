"""The app's screens: the chat itself and the dialogs it opens."""
