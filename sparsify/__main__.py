"""``python -m sparsify``: the same CLI (used with torchrun)."""
from sparsify.cli import main

main()
