"""``edge-vit deploy``: from an `edge-vit export onnx` folder to a camera service on a Jetson.

- ``target.py``: what the machine is (Jetson module, JetPack/L4T, TensorRT, CUDA, memory, power
  mode), read from files under a root folder so tests can point it at a recorded tree.
- ``budget.py``: will the engines, KV cache, detector and runtime fit the device's memory (pure).
- ``service.py``: the ``edge-vit run`` arguments, the systemd unit, the ``docker run`` script (pure text).
- ``plan.py``: checks + budget + build-or-reuse decisions + files, then the execution that builds and writes.
- ``cli.py``: ``edge-vit deploy jetson ...``, registered by ``add_deploy_commands(subparsers)``.

Nothing here imports torch, tensorrt or ultralytics at import time.
"""
