"""The robust-representation system of Zhu, Zhang & Evans (ICML 2020): data, models, critics, training, estimation.

Submodules are imported explicitly (``from rmi_fast.robust import data``); importing this package loads nothing heavy.
"""
