"""`python -m dgls` is the `dgls` command; with no arguments it serves the language server on stdio (how
editors launch it)."""

import sys

from dgls.cli import main

raise SystemExit(main(sys.argv[1:] or ["lsp"]))
