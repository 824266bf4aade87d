"""`kd STAGE [hydra flags and overrides]`: the stage dispatcher in front of @hydra.main.

It maps the stage word to its primary config, moves Hydra's own flags in front of the
overrides (plain Hydra rejects `-m` between two overrides), turns every error into one line on
stderr with a non-zero exit (KD_DEBUG=1 or `--debug` shows the traceback), and completes stage
names in bash before handing completion of overrides to Hydra.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from kd_cli.commands import COMMANDS
from kd_cli.errors import (
    INTERRUPTED_RUNS,
    INTERRUPTION_NOTES,
    library_warnings_as_kd_lines,
    one_line,
    single_line,
    take_error,
    unknown_choice,
)
from kd_cli.stages import STAGES

# Hydra flags that take a value (the value travels with the flag when flags are moved).
FLAGS_WITH_VALUE = {
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "-p",
    "--package",
    "-sc",
    "--shell-completion",
    "-i",
    "--info",
    "--experimental-rerun",
}
FLAGS_WITHOUT_VALUE = {
    "-m",
    "--multirun",
    "--cfg",
    "-c",
    "--resolve",
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "-r",
    "--run",
}
# Flags whose value is optional (`--info` alone, or `--info config`); `--cfg` always takes one.
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def usage() -> str:
    commands = available_commands()
    width = max(len(name) for name in [*STAGES, *commands])
    lines = ["usage: kd STAGE [overrides...] [hydra flags]", "", "stages:"]
    lines += [f"  {name:<{width}}  {stage.summary}" for name, stage in STAGES.items()]
    lines += [f"  {name:<{width}}  {summary}" for name, (_module, summary) in commands.items()]
    lines += [
        "",
        "Every setting is a Hydra override, e.g. `kd distill dataset=mnist student=mlp trainer.epochs=5`.",
        "`kd STAGE --help` lists a stage's config groups and options; `-m` sweeps (`method.temperature=2,4`).",
        "Errors print one line; set KD_DEBUG=1 (or pass --debug) to see the traceback.",
    ]
    return "\n".join(lines)


def available_commands() -> dict[str, tuple[str, str]]:
    """Only the commands whose module is present are listed and dispatched."""
    from importlib.util import find_spec

    return {name: entry for name, entry in COMMANDS.items() if _module_exists(entry[0], find_spec)}


def _module_exists(module: str, find_spec) -> bool:
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def reorder_hydra_flags(args: list[str]) -> list[str]:
    """Hydra flags (with their values) first, overrides after, each in their original order."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in FLAGS_WITH_VALUE:
            takes_value = arg not in ("-i", "--info") or (i + 1 < len(args) and args[i + 1] in INFO_VALUES)
            flags += args[i : i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
        elif arg in ("--cfg", "-c"):
            flags += args[i : i + 2]
            i += 2
        elif arg in FLAGS_WITHOUT_VALUE or (arg.startswith("-") and "=" not in arg and not arg[1:2].isdigit()):
            flags.append(arg)
            i += 1
        else:
            overrides.append(arg)
            i += 1
    return flags + overrides


def import_shorthand(args: list[str]) -> list[str]:
    """`kd import PATH arch=NAME` -> `source=PATH model.arch=NAME`. PATH is the word that names a file or
    folder that exists, whatever its characters (Lightning's `epoch=9-step=1000.ckpt`, `-model.pt`), else
    the first word without `=` that is not a flag; a second such word is one line."""
    import os

    from kd_cli.errors import KdError

    if any(a.startswith("source=") for a in args):
        return [f"model.{a}" if a.startswith("arch=") else a for a in args]
    out, source = [], None
    for arg in args:
        names_a_path = os.path.exists(os.path.expanduser(arg)) and not arg.startswith(("arch=", "-cd", "-cp", "-cn"))
        if names_a_path or ("=" not in arg and not arg.startswith("-")):
            if source is not None:
                raise KdError(f"kd import takes one checkpoint; {source} and {arg} were both given")
            source = arg
            out.append(f"source={arg}")
        elif arg.startswith("arch="):
            out.append(f"model.{arg}")
        else:
            out.append(arg)
    return out


def complete_stage_or_strip(line: str) -> str | None:
    """Bash completion: stage names while the stage word is typed, else the line without it."""
    words = line.split()
    typing_stage = len(words) == 1 or (len(words) == 2 and not line.endswith(" "))
    if typing_stage:
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(name for name in [*STAGES, *available_commands()] if name.startswith(prefix)))
        return None
    return " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")


def run_hydra_stage(stage: str, args: list[str]) -> None:
    import hydra

    from kd_cli.config import register_configs
    from kd_cli.stages import run

    register_configs()
    from kd_cli.overrides import prepare_overrides

    sys.argv = [sys.argv[0], *prepare_overrides(reorder_hydra_flags(args))]
    main_fn: Callable = hydra.main(
        version_base="1.3", config_path="pkg://kd_cli.configs", config_name=STAGES[stage].config
    )(run)
    main_fn()
    error = take_error()
    if error is not None:
        raise error


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("KD_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    # Let exceptions reach us instead of Hydra's multi-line report; we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from kd_cli.engine.process import (
        ignore_stop_signals,
        install_interrupt_handlers,
        watch_parent,
    )
    from kd_cli.engine.slurm import adopt_slurm_tasks

    adopt_slurm_tasks()  # one of several tasks of a SLURM step: DDP ranks as torchrun would set them
    install_interrupt_handlers()  # SIGTERM / SIGHUP stop a run as Ctrl-C does: it records `interrupted`
    library_warnings_as_kd_lines()  # torch's, Pillow's, ... warnings: one kd line each, not their reports
    watch_parent()  # a child of another kd process stops when that process dies
    try:
        code = dispatch(args)
    except KeyboardInterrupt:
        print(f"kd: error: {interrupted_message()}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_ERROR)
    except BaseException as error:  # noqa: BLE001 - the CLI boundary: one line, no traceback
        if debug:
            raise
        where = "hydra.run.dir=, paths.outputs=" if args and args[0] in STAGES else ""
        print(f"kd: error: {single_line(one_line(error, where))}", file=sys.stderr)
        code = EXIT_ERROR
    ignore_stop_signals()  # the command is over: a late Ctrl-C must not interrupt the interpreter's exit
    sys.exit(code)


def interrupted_message() -> str:
    """Which runs the interrupt left unfinished (and how to continue them), or that it left none."""
    if INTERRUPTION_NOTES:
        return INTERRUPTION_NOTES[-1]
    if not INTERRUPTED_RUNS:
        return "interrupted; no run was left unfinished"
    run = INTERRUPTED_RUNS[-1]
    return f"interrupted; {run} keeps its last checkpoint: continue it with resume={run}"


def dispatch(args: list[str]) -> int:
    if "COMP_LINE" in os.environ and any(a in ("-sc", "--shell-completion") for a in args):
        return complete(args)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from kd_cli import __version__

        print(f"kd {__version__}")
        return 0
    stage, rest = args[0], args[1:]
    if stage.startswith("-") and any(a in ("-sc", "--shell-completion") for a in args):
        run_hydra_stage("distill", args)  # `kd -sc install=bash`: any stage prints the script
        return 0
    commands = available_commands()
    if stage in commands:
        from importlib import import_module

        return import_module(commands[stage][0]).main(rest)
    if stage not in STAGES:
        raise unknown_choice("stage", stage, [*STAGES, *commands])
    from kd_cli.stages.resume import guard_run_dir, resume_arguments

    if stage == "import":
        rest = import_shorthand(rest)
    rest = resume_arguments(stage, rest)
    guard_run_dir(stage, rest)
    run_hydra_stage(stage, rest)
    return 0


def complete(args: list[str]) -> int:
    stripped = complete_stage_or_strip(os.environ["COMP_LINE"])
    if stripped is None:
        return 0
    stage = os.environ["COMP_LINE"].split()[1]
    if stage not in STAGES:
        return 0
    os.environ["COMP_LINE"] = stripped
    os.environ["COMP_POINT"] = str(len(stripped))
    run_hydra_stage(stage, [a for a in args if a != stage])
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
