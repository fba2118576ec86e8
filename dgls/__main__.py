"""`python -m dgls` is the `dgls` command."""

from dgls.cli import main

raise SystemExit(main())
