"""Looking at a generator and inside it: samples, interpolations, attention maps, the HTML report.

- `sample`: `sample_images`, `sagan sample`'s PNG / NPZ writer.
- `interpolate`: `sagan interpolate`, walks between seeds or classes.
- `attention`: `attention_view`, where each attention layer looks for chosen query pixels (`sagan attn-map`).
- `attention_stats`: `AttentionProbe`, how far and how sharply attention looks, logged while training.
- `explorer` and `report`: `build_report`, one self-contained page about a run (`templates/` beside it).

Depends on `sagan_cli.data`, `sagan_cli.interchange` and `sagan_cli.model`.
"""

__all__ = ["attention", "attention_stats", "explorer", "interpolate", "report", "sample"]
