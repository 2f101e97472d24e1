"""Generation backends: transformers (CPU/CUDA) and LMDeploy TurboMind (GPU, optional)."""
