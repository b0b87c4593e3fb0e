"""``python -m plant_gateway.cli``: the same as the ``plant-gateway`` command.

Used by tests to start the gateway with the current interpreter.
"""

from plant_gateway.cli import main

main()
