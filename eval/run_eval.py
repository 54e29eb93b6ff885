"""Run the hf_turbo eval from a checkout: ``python eval/run_eval.py --quick --out eval/out``.

The same as ``hf-turbo eval`` (the code is the package ``hf_turbo.eval``); see its docstring for
the contract and ``--help`` for the options.
"""

from __future__ import annotations

import sys

from hf_turbo.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
