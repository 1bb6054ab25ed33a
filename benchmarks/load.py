"""Load benchmark: ``python benchmarks/load.py [--model llama-8b-4l] [--device cuda]``.

Same as ``loadfsm bench``; see loadfsm/bench.py for what is measured.
"""

import sys

from loadfsm.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
