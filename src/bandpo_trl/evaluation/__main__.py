"""`python -m bandpo_trl.evaluation`: the `bandpo-eval` command."""

from .cli import main

if __name__ == "__main__":
    main()
