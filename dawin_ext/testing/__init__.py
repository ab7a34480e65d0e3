"""Plain-PyTorch mirrors of the ops and the methods, public so that users can compare results against them.

- :mod:`.reference_ops`: the compiled ops written in a few lines of PyTorch (float64 where it matters).
- :mod:`.reference_methods`: WiSE-FT, DaWin and AdaWiSE written from the papers, independent of :mod:`dawin_ext.methods`.

They import nothing from the code they check, so a bug cannot hide by being on both sides of a comparison.
"""
