"""Training: the loop and everything a run keeps while it trains.

- `loop`: `run_training`, set up then one plain loop; `train_step`.
- `step`: the step's phases (D update, G update) and `update_plan`; `augment`: DiffAugment of what D sees.
- `nets`: what trains (G, D, their optimisers, the EMA of G); `batches`: real batches and noise in resumable order.
- `monitor`: metrics.jsonl, TensorBoard, samples and evaluation while training; `checkpointer`: what is saved.
- `state`: the resumable state; `run_folder` and `run_lock`: the run folder and its single writer.
- `launcher`: workers that die with their torchrun / accelerate launcher.

Depends on every library package below the command line (evaluation, inspection, interchange, data, model).
"""

__all__ = ["augment", "batches", "checkpointer", "launcher", "loop", "monitor", "nets", "run_folder", "run_lock",
           "state", "step"]
