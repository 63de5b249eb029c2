"""Edge compression: int8 quantisation (``quant``), channel pruning (``prune``), knowledge
distillation (``distill``), and the edge variants built from them (``variants``).

The submodules are imported explicitly by their users (``dynray.store`` needs ``quant``
while ``variants`` needs ``dynray.store``), so this package imports none of them.
"""
