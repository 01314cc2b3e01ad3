"""Drop-in layers for existing DARTS code bases, on fastdarts's modules and kernels.

- :mod:`fastdarts.compat.darts`: quark0/darts ``cnn/`` (``model_search``, ``operations``, ``architect``).
- :mod:`fastdarts.compat.pcdarts`: yuhuixu1993/PC-DARTS (``model_search``: partial channels and betas).
- :mod:`fastdarts.compat.ptdarts`: khanrc/pt.darts (``models/search_cnn``, ``models/ops``, ``architect``).

Each keeps the original's constructor signatures, methods, and parameter and buffer names and shapes, so a
state_dict saved by the original loads into the compat model and back.
"""
