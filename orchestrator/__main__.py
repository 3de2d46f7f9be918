"""`python -m orchestrator` is the same Hydra app as the `datamodels` console script."""
from orchestrator.cli import main

if __name__ == "__main__":
    main()
