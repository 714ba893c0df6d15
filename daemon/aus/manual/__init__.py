"""The manual pages and shell completions of ausd, ausctl and aus-server.

Both are made from each command's own argparse parser when the Debian
packages are built (``python3 -m aus.manual ROOT COMMAND...``, run by
packaging/debian/build.sh), never committed: a subcommand or option added
to a parser is in the next package's man page and completion without
anyone writing it twice. What a parser cannot say (the description, the
files, the exit codes) is written by hand in :mod:`aus.manual.pages`.

- :mod:`aus.manual.pages`: per command, its section and hand-written text,
  and where its parser lives (imported by name: this package imports no
  role, and ships in neither package).
- :mod:`aus.manual.roff`: a parser and its page -> man(7) source.
- :mod:`aus.manual.completion`: a parser -> bash and zsh completion (shtab).
"""
