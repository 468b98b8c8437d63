"""Pipeline stages: one module per processor, each exposing ``build(deps, arg)``."""
