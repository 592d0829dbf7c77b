"""Export of quantized models: ONNX with QuantizeLinear/DequantizeLinear nodes (optional extra ``[onnx]``)."""

from dfq_search.export.onnx import DEFAULT_OPSET, check_onnx, export_onnx, qdq_module

__all__ = ["DEFAULT_OPSET", "check_onnx", "export_onnx", "qdq_module"]
