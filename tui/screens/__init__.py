"""One module per screen of the TUI; each is a widget shown in one tab of the app."""
