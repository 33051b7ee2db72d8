"""`python -m bandpo_trl.evaluate`: an alias of `bandpo-eval` (`python -m bandpo_trl.evaluation`), kept for scripts
written against it.

The code lives in the [`bandpo_trl.evaluation`] package (its command line in `bandpo_trl.evaluation.cli`); this
module re-exports its public names, so that `from bandpo_trl.evaluate import ...` and `python -m bandpo_trl.evaluate`
keep working.

```bash
python -m bandpo_trl.evaluate --model Qwen/Qwen2.5-3B-Instruct --adapter outputs/qwen-lora --benchmarks math500
```
"""

from .evaluation import *  # noqa: F403
from .evaluation import __all__, main  # noqa: F401  (__all__: the same public names)

if __name__ == "__main__":
    main()
