"""The `sepme app` page as a Hugging Face Space (a Space runs this file and serves `demo`); locally:
`python examples/app.py` (needs `pip install "sepme-adapter[app]"`). Set up: docs/app.md.

The Space's variables (Settings -> Variables and secrets) choose what it shows:
    SEPME_MODEL     the base model: a Hub id (an SD v1 / v2 / XL checkpoint) or a local folder
    SEPME_ERASERS   eraser repos, files or folders for it, separated by spaces (`sepme push` makes a repo)
Without SEPME_MODEL it shows the built-in demo world and its three style erasers, trained on the first start
and cached in SEPME_DEMO_OUT (default ./sepme-demo); the demo world's weights come with the source
repository, not the wheel, so that Space must hold a copy of the repository.
"""

import os

from sepme_adapter.app import build_app, demo_app, offline_theme

MODEL = os.environ.get("SEPME_MODEL", "").strip()
ERASERS = os.environ.get("SEPME_ERASERS", "").split()

if MODEL:
    from sepme_adapter.pipelines import load_pipeline

    demo = build_app(load_pipeline(MODEL), ERASERS, title=f"SepME: toggle erasers live on {MODEL}")
else:
    demo = demo_app(os.environ.get("SEPME_DEMO_OUT", "sepme-demo"))

if __name__ == "__main__":
    demo.launch(theme=offline_theme())
