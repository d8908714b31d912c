"""``python -m annsample.cli``: the ``annsample`` command (what ``torchrun -m annsample.cli`` runs)."""

from annsample.cli.main import main

main(prog_name="annsample")
