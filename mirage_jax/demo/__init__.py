"""The README's main command, `python -m mirage_jax.demo` (`make demo`): see mirage_jax/demo/__main__.py.

`preempt`: the preemption drill from outside a run (start a training command, SIGTERM it once its metrics log
reaches a step, wait for the exit), which the demo's training stage uses and the resume tests reuse.
"""
