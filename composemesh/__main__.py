"""Lets `python -m composemesh` run the command line."""

from composemesh.cli import main

main()
