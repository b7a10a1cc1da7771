"""``python -m compressor``: the same CLI as the console script, for launchers that run modules (torchrun -m)."""

from compressor.cli import main

main()
