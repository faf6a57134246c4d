"""Studies that use medseg3d rather than make it up: not part of the core flow.

``compare``: train several networks under one wall-clock budget and compare accuracy and cost.
The core (io → preprocessing → inference → io, and training) never imports this package.
"""
