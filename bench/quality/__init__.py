"""Does SHARP beat the baselines? The comparison table of issue 6: ``python -m bench.quality``.

One teacher, one student architecture, and a grid of *cells* = methods × seeds, every cell
trained by the one trainer (`sharp_core.train.loop.train`) for the same number of steps on the
same data, from the same initialisation and batch order for a given seed (the trainer seeds
the student's init and the batch stream from ``training.seed``), so two methods can be
compared *paired by seed*.

    python -m bench.quality --preset tiny-cpu [--out DIR] [--teacher HF_FOLDER]
                            [--methods kd sharp ...] [--seeds 3] [--split val|test]
                            [--sharp-set granularities.layer=0.1 ...] [--set method.kd_weight=0.9]
                            [--variant anneal attention_schedule=linear_decay ...]

Why each choice:

* **Splits are files** written into the run folder: ``train.txt`` (head of the corpus),
  ``val.txt`` (the next slice) and ``test.txt`` (the held-out tail), cut on paragraph
  boundaries. The trainer's own periodic evaluation (the ``eval_fraction`` tail of
  ``train.txt``) gives the eval-loss curves; the *reported* numbers are perplexities of each
  cell's final checkpoint on ``val.txt`` (while tuning) or ``test.txt`` (once, at the end),
  computed by `sharp_core.evaluate.perplexity.perplexity`. Tuning never sees the test file: the test
  perplexity is only computed when ``--split test`` is asked for.
* **Cells are spec dicts** built from one base spec plus a table of per-method overrides
  (`method_table`), never copies of code: an ablation is exactly one spec flag away from
  ``sharp``. ``sharp`` itself is the spec's *default* SHARP (``MethodSpec()``), so when the
  variant search changes the defaults, this table follows; ``--sharp-set`` overrides the
  SHARP base of one run (for the search), and with it every ablation.
* **The teacher** is trained inside the run (method ``sft``, dropout, early stopping on the
  trainer's eval loss, best checkpoint kept) or is any Hugging Face folder (``--teacher``).
  The students always use the teacher's tokenizer, so every perplexity is per the same token.
* **Sanity check**: a comparison between distillation methods means nothing if the teacher
  is not clearly better than its students (the pilot of issue 6 showed every attention term
  hurting more with an over-fitted teacher). After each cell, the teacher's perplexity on
  the reported split must be below ``sanity_ratio`` (0.9) × that student's; the first cell
  is ``sft`` (the teacher-free student), so a useless teacher is refused after one cell.
  On refusal the run stops, writes the refusal into ``results.json`` / ``results.md`` and
  exits with status 2.
* **Resumable**: a cell whose ``result.json`` exists is skipped (counted in
  ``RunSummary.skipped``); an interrupted cell resumes from its last checkpoint (the
  trainer's own resume; the ``gpu`` preset checkpoints every 500 steps, a ``tiny-cpu`` cell
  of about a minute restarts), and its metrics log (``metrics.jsonl``) is appended to, later
  lines for a step replacing earlier ones.
* **Uncertainty**: a method's perplexity is the mean ± sample std over seeds. Its change
  against the best baseline (lowest mean perplexity among the baselines) is the *paired*
  per-seed difference Δ_s = 100·(ppl_m,s / ppl_b,s − 1), reported as mean, standard error and
  a 95% Student-t interval over seeds: same seed = same init and batches, so the pairing
  removes the seed-to-seed variance both share.
* **Speed** is the median of the trainer's per-step ``tokens_per_s`` over steps without
  diagnostics or evaluation (on a shared machine the median is robust to other jobs), plus
  the cell's wall and process CPU seconds.
* **Interference diagnostics**: ``sharp`` and ``sharp-direct`` set ``interference_every``
  to ~10% of the steps, so the per-term gradient cosines on the student's parameters
  (``cos_logit_sharp_layer`` …) are recorded over training; ``sharp-pcgrad`` computes them at
  every step (PCGrad needs the per-term gradients anyway) and they are kept too.

Modules: `presets` (shapes and budgets), `grid` (the spec of every cell), `data` (the corpus
and its splits), `cells` (training a cell or the teacher, resumably), `stats` (mean ± std,
paired Δ, intervals, computed by `sharp_core.study.compare` as in the service's sweep report),
`report` (results.md, plots), `run` (one run of the table), `cli`.
"""

from bench.quality.cells import SanityCheckError
from bench.quality.cli import main
from bench.quality.grid import BASELINES, base_spec, cell_spec, method_table, parse_assignments
from bench.quality.presets import PRESETS, Preset
from bench.quality.run import RunSummary, run

__all__ = [
    "BASELINES",
    "PRESETS",
    "Preset",
    "RunSummary",
    "SanityCheckError",
    "base_spec",
    "cell_spec",
    "main",
    "method_table",
    "parse_assignments",
    "run",
]
