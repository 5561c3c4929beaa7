"""`python -m sagan_cli ...` (also what `accelerate launch -m sagan_cli train ...` runs)."""

from sagan_cli.cli import main

main()
