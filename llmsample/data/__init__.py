"""Corpora and data sets shipped or loaded by name, and the prompt sets built from them.

    from llmsample.data.shakespeare import load_plays, split_plays   # the plays
    from llmsample.data.commongen import load_commongen              # CommonGen, shipped
    from llmsample.data.tasks import build_task                      # evals' and recipes' tasks
    task = build_task("line-infill", num_prompts=50, seed=0)

The submodules are imported by name; ``llmsample.data`` itself re-exports the tasks.
"""

from llmsample.data.tasks import TASKS, Example, Task, build_task

__all__ = ["Example", "Task", "build_task", "TASKS"]
