"""Converts a saved Keras model with tf2onnx, as TensorFlow users export (run by tests/zoo/export.py
in the TensorFlow venv, .venv-tf: tensorflow-cpu and tf2onnx never share a venv with torch).

    python tests/zoo/tf2onnx_export.py MODEL.keras OUT.onnx

The model is saved by the zoo venv (Keras on its torch backend, where the references run) and
loaded here on the TensorFlow backend, so both sides hold the same weights. The input keeps a
free batch and fixed height and width, as `tf2onnx.convert.from_keras` is usually called;
tf2onnx picks its default opset.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf
import tf2onnx


def main(saved: str, out: str) -> None:
    model = keras.models.load_model(saved, compile=False)
    _, height, width, channels = model.inputs[0].shape
    spec = (tf.TensorSpec((None, height, width, channels), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, output_path=out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
