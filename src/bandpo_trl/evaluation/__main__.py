"""`python -m bandpo_trl.evaluation`: the same command as `bandpo-eval` / `python -m bandpo_trl.evaluate`."""

from .runner import main

if __name__ == "__main__":
    main()
