"""Training tasks: each builds a frozen teacher, a student and a loss (image_kd)."""
