"""Face detectors for the focal-point crop. Optional: OpenCV is not a dependency.

`make_detector("auto", models_dir)` gives OpenCV's YuNet DNN detector when opencv is installed
and models/opencv/face_detection_yunet*.onnx exists, else OpenCV's Haar cascades (shipped with
opencv), else None (the focal point then uses entropy and edges only). Any callable
image -> [(x, y, w, h), ...] can be passed to transforms.focal_crop instead."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.transforms import FaceDetector

HAAR_CASCADES = ["haarcascade_eye.xml", "haarcascade_frontalface_default.xml",
                 "haarcascade_profileface.xml", "haarcascade_frontalface_alt.xml",
                 "haarcascade_frontalface_alt2.xml", "haarcascade_frontalface_alt_tree.xml",
                 "haarcascade_eye_tree_eyeglasses.xml", "haarcascade_upperbody.xml"]


class FaceDetectorMissing(RuntimeError):
    @property
    def user_message(self) -> str:
        return str(self)


def _cv2():
    try:
        import cv2
        return cv2
    except ImportError:
        return None


def make_detector(kind: str, models_dir: Path | None = None) -> FaceDetector | None:
    if kind == "none":
        return None
    cv2 = _cv2()
    if cv2 is None:
        if kind == "opencv":
            raise FaceDetectorMissing("face_detector: opencv is not installed "
                                      "(pip install opencv-python-headless), or choose auto/none")
        return None
    yunet = sorted((models_dir / "opencv").glob("face_detection_yunet*.onnx")) if models_dir else []
    if yunet and hasattr(cv2, "FaceDetectorYN"):
        return _yunet(cv2, yunet[-1])
    return _haar(cv2)


def _yunet(cv2, model: Path) -> FaceDetector:
    def detect(image):
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        detector = cv2.FaceDetectorYN.create(str(model), "", (image.width, image.height),
                                             0.9, 0.3, 5000)
        _, faces = detector.detect(bgr)
        return [tuple(float(v) for v in face[:4]) for face in (faces if faces is not None else [])]
    return detect


def _haar(cv2) -> FaceDetector:
    def detect(image):
        grey = np.asarray(image.convert("L"))
        for name, min_fraction in zip(HAAR_CASCADES, [0.01] + [0.05] * (len(HAAR_CASCADES) - 1)):
            classifier = cv2.CascadeClassifier(cv2.data.haarcascades + name)
            if classifier.empty():
                continue
            side = int(min(image.size) * min_fraction)
            try:
                faces = classifier.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=7,
                                                    minSize=(side, side))
            except Exception:
                continue
            if len(faces):
                return [tuple(float(v) for v in face) for face in faces]
        return []
    return detect
