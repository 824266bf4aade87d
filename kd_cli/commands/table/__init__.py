"""`kd table`: the literature's tables as one command (command.py), described by YAML files (recipe.py)."""
