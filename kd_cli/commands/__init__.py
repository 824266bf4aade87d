"""The commands that are not Hydra stages: plain argparse commands over runs, files and tables, each a
module with `main(argv) -> int`. A new command is one row here and its module."""

from __future__ import annotations

# name -> (module, its line in `kd`'s list of commands)
COMMANDS: dict[str, tuple[str, str]] = {
    "report": ("kd_cli.commands.report.command", "tables and plots over runs and sweeps (mean ± std over seeds)"),
    "reproduce": ("kd_cli.commands.reproduce", "rerun a saved run from its config and compare the final metrics"),
    "predict": ("kd_cli.commands.predict", "classify image files with a trained or exported model: CSV of the top k"),
    "table": (
        "kd_cli.commands.table.command",
        "run a literature table's grid (pairs x methods x seeds), set beside the published figures",
    ),
    "cache": ("kd_cli.commands.cache", "list or clear the teacher cache (teacher outputs shared by distill runs)"),
}
