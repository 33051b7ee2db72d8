"""`bandpo-eval` / `python -m bandpo_trl.evaluate`: benchmark evaluation (mean@k, pass@k) of a checkpoint.

The code lives in the [`bandpo_trl.evaluation`] package (one module per job: arguments, scoring, generation, loading,
runner, callback); this module re-exports its public names, so that `from bandpo_trl.evaluate import ...`, the
`bandpo-eval` console script (`bandpo_trl.evaluate:main`) and `python -m bandpo_trl.evaluate` keep working.

```bash
bandpo-eval --model outputs/qwen-bandpo --benchmarks aime24 aime25 amc23 --k 32 --max_new_tokens 4096
python -m bandpo_trl.evaluate --model Qwen/Qwen2.5-3B-Instruct --adapter outputs/qwen-lora --benchmarks math500
```
"""

from .evaluation import *  # noqa: F403
from .evaluation import __all__, main  # noqa: F401  (__all__: the same public names)

if __name__ == "__main__":
    main()
