"""`python -m builder.cli ...` (what `accelerate launch -m builder.cli train ...` runs): the same as `spa-vl ...`."""

from builder.cli import main

main()
