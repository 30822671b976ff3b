"""The `vtn bench` benchmarks, one module each (cli.py declares their subcommands); common.py holds what they share.

They print figures measured on this machine; the README's benchmark section keeps the figures worth keeping.
"""
