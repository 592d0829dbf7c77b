"""Export of quantized models: ONNX with QuantizeLinear/DequantizeLinear nodes (onnx and onnxruntime)."""

from dfq_search.export.onnx import DEFAULT_OPSET, check_onnx, export_onnx, qdq_module

__all__ = ["DEFAULT_OPSET", "check_onnx", "export_onnx", "qdq_module"]
