"""The work of each `mrcnn` subcommand: `run(args)` -> exit status, one module per command.

cli.py parses the arguments (importing nothing heavy) and imports the module of the command that
runs. Each `run` is thin: load, call the library function the notebooks call too, print.
"""
