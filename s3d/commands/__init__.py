"""Sub-commands of the ``s3d`` CLI, one module each.

A module here defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed ``argparse.Namespace``, returns an exit code).
:func:`s3d.cli.build_parser` discovers the modules, so a new command is a new file.
"""
