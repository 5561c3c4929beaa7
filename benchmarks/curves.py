"""Step/time and loss curves of one or more training runs, from their metrics.jsonl, as one small PNG.

    python benchmarks/curves.py RUN_DIR [RUN_DIR ...] --out docs/fashion-mnist-curves.png [--labels a b]

Elapsed time is rebuilt from the log: each line's `img_per_s` covers the images since the previous
line (`train.log_every` steps of `train.batch_size`, read from the run's config.json), including the
grids and checkpoints written in that window. Start-up (reading the data, building the models) is not
in it; compare with the wall time of the whole command. Prints each run's total minutes and steps/s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run: Path) -> dict[str, list[float]]:
    """Per logged step: step, elapsed minutes, D and G losses."""
    config = json.loads((run / "config.json").read_text())
    batch = config["train"]["batch_size"]
    steps, minutes, loss_d, loss_g = [0], [0.0], [], []
    elapsed = 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "img_per_s" not in record:  # structure / eval lines
            continue
        elapsed += (record["step"] - steps[-1]) * batch / record["img_per_s"]
        steps.append(record["step"])
        minutes.append(elapsed / 60)
        loss_d.append(record["loss_d"])
        loss_g.append(record["loss_g"])
    return {"step": steps, "minutes": minutes, "loss_d": loss_d, "loss_g": loss_g}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*", help="one label per run (default: the folder names)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    fig, (ax_time, ax_loss) = plt.subplots(1, 2, figsize=(8, 3), dpi=100, layout="constrained")
    for run, label in zip(args.runs, labels, strict=True):
        curve = read_run(run)
        total, last = curve["minutes"][-1], curve["step"][-1]
        print(f"{label}: {last} steps in {total:.2f} min of training loop, {last / (total * 60):.2f} steps/s")
        (line,) = ax_time.plot(curve["minutes"], curve["step"], label=f"{label} ({total:.1f} min)")
        ax_loss.plot(curve["step"][1:], curve["loss_d"], color=line.get_color(), lw=1, label=f"{label}: D")
        ax_loss.plot(curve["step"][1:], curve["loss_g"], color=line.get_color(), lw=1, ls="--", label=f"{label}: G")
    ax_time.set(xlabel="minutes (training loop)", ylabel="step", title="steps over time")
    ax_loss.set(xlabel="step", ylabel="hinge loss", title="losses (D solid, G dashed)")
    ax_time.legend(fontsize=7)
    ax_loss.legend(fontsize=6, ncol=2)
    for ax in (ax_time, ax_loss):
        ax.grid(alpha=0.3)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
