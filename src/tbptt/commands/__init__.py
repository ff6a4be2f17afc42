"""One module per `tbptt` subcommand; each defines register(subparsers)."""
