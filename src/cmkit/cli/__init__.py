"""The ``cmkit`` command line: ``main`` (the parser and the command functions), ``options`` (the options several
commands share), and one module per group of commands: ``eval``, ``edit``, ``decoder`` (decode, encode,
convert-decoder) and ``serve``. The work itself is done by the libraries; these modules parse and check."""
