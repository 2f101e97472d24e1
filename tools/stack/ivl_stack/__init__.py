"""ivl_stack: starts the whole stack with one command."""
