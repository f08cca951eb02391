"""The HTTP service: app factory, routes, settings, errors, middleware and the CLI."""
