"""Rebuild the demo world's assets (pipeline, classifiers, recipe) into the package.

python examples/build_demo_world.py            # about 30 CPU minutes on one thread
python examples/build_demo_world.py --quick --out /tmp/demo-assets   # smoke test
"""

from sepme_adapter.demo.build import main

if __name__ == "__main__":
    main()
