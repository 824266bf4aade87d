"""kd: a command-line knowledge-distillation tool."""

__version__ = "0.1.0"
