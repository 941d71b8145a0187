"""`python -m dataselect ...`, e.g. `torchrun --nproc_per_node 2 -m dataselect build -r recipe.yaml`."""

from .cli import main

main()
