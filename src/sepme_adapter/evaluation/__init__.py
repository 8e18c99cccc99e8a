"""The paper's evaluation protocol (Sec. 4.1, App. C-D): ACC, LPIPS, `||dtheta||_p`, subset tables, grids.

- ACC: a classifier's accuracy on images generated from each concept's prompts; erased
  concepts should fall, the others stay.
- An image distance between the original model's image and the edited model's image for the same
  prompt and seed: LPIPS (AlexNet) when the ImageNet AlexNet weights are given or cached, else 1-SSIM,
  a pixel metric, under its own name (`image_metric`).
- The restoration tables (3, 4, 5, 8) evaluate every subset of a set of erasers.

| module | what it holds |
|---|---|
| `protocol` | `EvalConcept` (exact prompts, held-out paraphrases, compositions), subsets and scenarios, prompt files, `generate`, `evaluate` (all images through `generation.generate_batched`) |
| `metrics` | `image_metric` (`LPIPSMetric` or `SSIMDistance`), `dtheta_p` |
| `tables`, `grids` | the markdown tables (one builder), results files, image grids |
| `methods` | `evaluate_methods`: several methods' erasers side by side |
| `classifiers`, `style_classifier` | classifier specs; the paper's ResNet18-head style classifier |
| `attack` | robustness under attack: an UnlearnDiffAtk-style adversarial prompt search (discrete tokens and a continuous upper bound) and the attack success rate (`sepme attack`; import `sepme_adapter.evaluation.attack`) |

Evaluation imports the core only (never training, baselines or the demo): callers pass the demo's
classifier and prompts in.
"""

from .classifiers import classifier_from_spec, torchvision_classifier
from .grids import comparison_grid, image_grid
from .methods import evaluate_methods
from .metrics import ImageMetric, LPIPSMetric, SSIMDistance, dtheta_p, image_metric, to_tensor
from .protocol import (
    MEASURES,
    TEMPLATES,
    Classify,
    EvalConcept,
    all_subsets,
    concepts_from_csv,
    concepts_from_names,
    default_prompt,
    evaluate,
    generate,
    scenario_subsets,
)
from .style_classifier import BLANK_LABEL, load_style_classifier, train_style_classifier
from .tables import (
    SUMMARY_COLUMNS,
    comparison_table,
    generalisation_summary,
    markdown_table,
    summary_table,
    table,
    write_results,
)

__all__ = [
    "BLANK_LABEL",
    "MEASURES",
    "SUMMARY_COLUMNS",
    "TEMPLATES",
    "Classify",
    "EvalConcept",
    "ImageMetric",
    "LPIPSMetric",
    "SSIMDistance",
    "all_subsets",
    "classifier_from_spec",
    "comparison_grid",
    "comparison_table",
    "concepts_from_csv",
    "concepts_from_names",
    "default_prompt",
    "dtheta_p",
    "evaluate",
    "evaluate_methods",
    "generalisation_summary",
    "generate",
    "image_grid",
    "image_metric",
    "load_style_classifier",
    "markdown_table",
    "scenario_subsets",
    "summary_table",
    "table",
    "to_tensor",
    "torchvision_classifier",
    "train_style_classifier",
    "write_results",
]
