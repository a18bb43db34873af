"""lm-evaluation-harness tasks over data shipped in this folder (nothing is downloaded).

* ``seqzoo_text``: rolling log-likelihood of the documents in ``text.jsonl`` (word and byte perplexity, bits
  per byte), as lm-eval's ``wikitext`` task measures them.
* ``seqzoo_choice``: multiple choice over ``choice.jsonl`` (accuracy, length-normalised accuracy), the
  ``arc_easy`` layout.

Pass this folder to lm-eval as ``--include_path`` (``seqzoo-eval lm-eval`` does it itself); :data:`TASKS_DIR`
is its path.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAMES = ("seqzoo_text", "seqzoo_choice")
