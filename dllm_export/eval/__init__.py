"""The quality harness, torch-free (only a checkpoint's PyTorch backend imports torch).

- ``tasks``: the task generators and their held-out split
- ``harness``: ``evaluate(model, other=None, options)``, the report of ``dllm-export eval``
- ``masked``: masked-token accuracy and top-1 agreement at mask ratios
- ``likelihood``: the Monte-Carlo ELBO (LLaDA's estimator)
- ``generation``: task accuracy, generation agreement and speed
- ``models``, ``canvas``: what a model must answer, and the inputs both models share
- ``report``: the terminal table; ``lm_eval_adapter``: the lm-evaluation-harness model
"""
