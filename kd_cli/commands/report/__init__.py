"""`kd report`: tables and plots over run directories and sweeps.

discover.py finds and loads runs, table.py groups them into settings (runs that differ only in
`seed`) and aggregates over seeds, plots.py draws, command.py is the command line.
"""
