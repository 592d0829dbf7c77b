"""dfq_search: data-free quantization of BatchNorm CNNs and a search for per-layer bit widths.

The algorithms are plain torch (``dfq_search.quant``, ``.models``, ``.data``, ``.synth``, ``.ptq``,
``.qat``); Ray and TensorBoard are imported only at the edges that need them.
"""

__version__ = "0.1.0"
