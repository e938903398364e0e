"""The HTTP layer: app factory, envelope, middlewares, health, metrics."""
