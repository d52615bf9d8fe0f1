"""The eval tasks (``line-infill``, ``keywords``, ``commongen``): they live in
:mod:`llmsample.data.tasks`, shared with the recipes; this module re-exports them.

    from evals.tasks import build_task      # same as: from llmsample.data.tasks import ...
    task = build_task("keywords", num_prompts=50)
    task.examples[0].prompt, task.examples[0].references, task.potential(model, tok)
"""

from llmsample.data.tasks import TASKS, Example, Task, build_task, speeches

__all__ = ["Example", "Task", "build_task", "speeches", "TASKS"]
