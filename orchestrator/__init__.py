"""The driver of a datamodels experiment: decides what to compute and where, and owns the
durable state (ledger, datamodels store, MLflow). Runs once per experiment, on the head node.
"""
