"""Computation that runs inside Ray tasks and actors.

Everything here takes plain arrays and plain configs and returns arrays; nothing here
imports Ray, touches the ledger or talks to MLflow, so each function can be called from a
test or a notebook with no cluster running.
"""
