"""The foundation every stage builds on; it imports no stage.

errors      NFMError, the one exception a user sees
io          atomic files and directories, safetensors and JSON with clear errors
config      frozen dataclass configs from presets, files and overrides; Literal choices checked at load
data        image sources (digits, Fashion-MNIST, Hugging Face) as tensors in [-1, 1]
images      sample grids as PNG (torchvision's make_grid / save_image)
sampling    the one recipe for preview and evaluation samples: fixed noise, labels, prior, grid
metrics     unit conversions shared by the stages (nats -> bits/dim)
seeding     derive_seed and BatchRandom: randomness as a pure function of (seed, step, row)
batches     the step-indexed batch stream of a map-style data set
distributed accelerate's process state (CPU / gloo / GPU)
rundir      run directory: logger, config.json, metrics.jsonl
checkpoint  EMA and atomic checkpoints (model, EMA, optimizer, step)
loop        TrainConfig, the learning-rate schedule and the training loop
"""
