"""The command line: one module per command, each parsing, validating, calling one library function
and rendering with rich. `app.py` wires them and translates library errors into one line."""
