"""Runtime and explanation engines. Nothing in here knows about HTTP."""
