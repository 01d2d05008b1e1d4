"""The ``hivewire`` command line: one typer app, one module per subcommand group."""
