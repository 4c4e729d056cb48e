//! Agreement with transformers and mlx-lm on committed fixtures (filled below).
