"""`segcli export`: the model as a TorchScript or ONNX file, and running such files in predict.

  graph.py        the whole pipeline in traceable form (dynamic sizes, exportable ops)
  nms.py          NMS over padded groups for each format (scripted loop / ONNX NonMaxSuppression)
  torchscript.py  trace, save with metadata, load
  onnx.py         export, save with metadata, load into ONNX Runtime (optional extra segcli[onnx])
  metadata.py     the JSON document that travels inside the file
  verify.py       exported vs eager on real photos, under the parity contract
  runtime.py      an exported file behaving like MaskRCNN for the Predictor
  samples/        the photos verification uses when no --images are given
"""
