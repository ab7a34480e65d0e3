"""The interpolation methods: WiSE-FT, DaWin (one and many tasks), AdaWiSE, their mixtures and their persistence.

They build on :mod:`dawin_ext.ops` (blending, entropies) and :mod:`dawin_ext.exact` (per-sample interpolation);
``import dawin_ext`` re-exports their public names. See the README's "Architecture" section.
"""
