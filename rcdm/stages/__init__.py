"""The ``rcdm <stage>`` commands, one module (or package, for ``study``) each.

A stage wires library functions (``rcdm/*.py``, ``rcdm/formats/``) to command-line arguments. It imports the
library and never another stage (only ``bench`` may exercise stages); the library never imports a stage.
``tests/test_layout.py`` checks both rules on the import graph.
"""
